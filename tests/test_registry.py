"""The model registry on disk: versions, the version in force, promote and rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.lifecycle.registry import Change, ModelRegistry, RegistryError, previous_version
from tests.conftest import run_cli


def run_dir(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = LinRecModel(ModelConfig(num_items=7, hidden_size=8, num_layers=1, num_heads=1, max_len=4,
                                    attention="linrec"))
    path.mkdir(parents=True)
    model.save(path / "model.pt")
    (path / "vocab.json").write_text(json.dumps({"items": ["<pad>"] + [f"i{k}" for k in range(1, 8)]}))
    (path / "last.pt").write_bytes(b"resume state, not part of a version")
    return model.version


def test_add_copies_the_model_and_keys_it_by_its_version(tmp_path: Path):
    v = run_dir(tmp_path / "run", 0)
    reg = ModelRegistry(tmp_path / "models")
    card = reg.add(tmp_path / "run", origin="train", note="first")
    assert card.version == v and card.num_items == 7 and card.attention == "linrec" and card.note == "first"
    folder = reg.path(v)
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.pt", "vocab.json"]
    assert LinRecModel.load(folder / "model.pt").version == v
    # Same weights again: the stored version is kept, not duplicated.
    assert reg.add(tmp_path / "run", note="again").note == "first"
    assert [c.version for c in reg.versions()] == [v]
    assert reg.current() is None
    with pytest.raises(RegistryError, match="model.pt is missing"):
        reg.add(tmp_path)


def test_prefixes_promote_and_rollback(tmp_path: Path):
    reg = ModelRegistry(tmp_path / "models")
    va, vb, vc = (run_dir(tmp_path / n, s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    for n in "abc":
        reg.add(tmp_path / n)
    assert reg.resolve(va[:6]) == va
    with pytest.raises(RegistryError, match="no version"):
        reg.resolve("zzzz")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    assert reg.promote(va[:8]) == Change("promote", va, None, reg.history()[-1].at)
    reg.promote(vb)
    reg.promote(vc)
    assert reg.current() == vc
    # Rollback is an undo stack: c -> b -> a, then nothing further.
    assert (reg.rollback().version, reg.current()) == (vb, vb)
    assert reg.rollback().version == va
    with pytest.raises(RegistryError, match="first version in force"):
        reg.rollback()
    # A promotion after rollbacks pushes again.
    reg.promote(vc)
    assert reg.rollback().version == va
    assert [h.action for h in reg.history()] == ["promote"] * 3 + ["rollback"] * 2 + ["promote", "rollback"]


def test_previous_version_follows_the_history():
    def ch(action: str, v: str) -> Change:
        return Change(action, v, None, 0.0)

    hist = [ch("promote", "a"), ch("promote", "b"), ch("promote", "b"), ch("promote", "c")]
    assert previous_version(hist, "c") == "b"
    assert previous_version(hist + [ch("rollback", "b")], "b") == "a"
    assert previous_version([ch("promote", "a")], "a") is None
    assert previous_version(hist, "a") is None  # CURRENT disagrees with the history: refuse


def test_models_cli_lists_shows_and_errors_in_one_line(tmp_path: Path):
    v = run_dir(tmp_path / "run", 3)
    (tmp_path / "run" / "meta.json").write_text(json.dumps({"test_full": {"ndcg@10": 0.1234}}))
    env = {"LINREC_REGISTRY_DIR": str(tmp_path / "models"), "LINREC_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    assert "no model versions" in run_cli("models", "list", env=env).stdout
    added = run_cli("models", "add", str(tmp_path / "run"), env=env)
    assert added.returncode == 0 and v[:12] in added.stdout
    listed = run_cli("models", "list", env=env).stdout
    assert v[:12] in listed and "0.1234" in listed and "*" not in listed
    shown = json.loads(run_cli("models", "show", v[:5], env=env).stdout)
    assert shown["version"] == v and shown["in_force"] is False and shown["metrics"]["test"]["ndcg@10"] == 0.1234
    for args, message in ((["show", "nope"], "no version 'nope'"), (["rollback"], "nothing to roll back"),
                          (["add", str(tmp_path / "missing")], "model.pt is missing")):
        res = run_cli("models", *args, env=env)
        assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
