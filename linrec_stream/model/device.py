"""Which torch device to run a model on, from a setting or flag ("auto", "cpu", "cuda", "cuda:1").

It lives in the model layer, not in training, because serving needs it too: a stream worker
resolves its device without importing any training code."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The device ``name`` stands for: "auto" is the GPU when torch sees one, else the CPU.

    Raises ValueError for a CUDA device on a machine without one, so the caller can report a
    wrong setting as such instead of failing later inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    return torch.device(name)
