"""Named model architectures, so every entry point that builds a model from nothing draws on one
source of defaults: :class:`~linrec_stream.model.linrec.ModelConfig`'s own field defaults.

- ``default``: ModelConfig's defaults (``linrec_decay``, hidden 64, 2 layers, 2 heads, feed-forward
  256, max_len 200, dropout 0.2): what ``train`` builds without architecture flags and what a
  retraining round trains when the registry holds no version yet.
- ``quickstart``: the small model the quickstart trains in a few CPU minutes (hidden 32,
  feed-forward 64, max_len 50); everything else is the default.

A preset is a ModelConfig *template*: its item count is a placeholder (:data:`TEMPLATE_ITEMS`),
replaced by the data's with :func:`sized`. Templates are plain ModelConfigs rather than a second
set of fields so that a new ModelConfig field, or a changed default, needs no change here.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

from .linrec import ModelConfig

#: The item count of a template: any valid one; the data decide the real one (``sized``).
TEMPLATE_ITEMS = 1

PRESETS: Mapping[str, ModelConfig] = MappingProxyType({
    "default": ModelConfig(num_items=TEMPLATE_ITEMS),
    "quickstart": ModelConfig(num_items=TEMPLATE_ITEMS, hidden_size=32, inner_size=64, max_len=50),
})


def sized(template: ModelConfig, num_items: int) -> ModelConfig:
    """``template``'s architecture for a vocabulary of ``num_items`` items."""
    return dataclasses.replace(template, num_items=num_items)


def preset(name: str, num_items: int) -> ModelConfig:
    """The architecture named ``name`` (a key of :data:`PRESETS`) for ``num_items`` items.

    Raises ValueError for an unknown name, naming the known ones."""
    try:
        template = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
    return sized(template, num_items)
