"""The model registry: versioned checkpoints in a directory, and which one is in force.

Layout (plain files, so that an object store could hold it later: version folders are written
once and never changed; only the two small files at the top change, each replaced atomically)::

    <registry_dir>/
        versions/<version>/model.pt    the checkpoint (config, weights, version id)
        versions/<version>/vocab.json  item vocabulary
        versions/<version>/card.json   ModelCard: what it is, what it was trained on, how it scored
        versions/<version>/...         anything else the run left (meta.json, curves.png)
        CURRENT.json                   {"version", "since", "action"}: the version workers serve
        history.jsonl                  one line per promote / rollback, oldest first

``version`` is the model's own id (a hash of its config and weights, ``LinRecModel.version``), so a
registry can never hold two different models under one name. Commands accept any unique prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from linrec_stream.model.run_dir import RESUME_FILE, load_run, missing_files

CARD = "card.json"
CURRENT = "CURRENT.json"
HISTORY = "history.jsonl"


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to...)."""


@dataclass(frozen=True)
class ModelCard:
    """Metadata of one registered version (``card.json``)."""

    version: str
    created: float  # epoch seconds
    attention: str
    num_items: int
    config: dict  # ModelConfig.to_dict()
    origin: str  # "train" (added from a run directory) or "retrain"
    parent: str | None = None  # the version it was warm-started from
    decision: str = "added"  # added | published | rejected (a retraining's verdict)
    data: dict = field(default_factory=dict)  # what it was trained on: events, users, items, time range
    metrics: dict = field(default_factory=dict)  # e.g. {"candidate": {...}, "current": {...}, "margin": 0.005}
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Change:
    """One promote or rollback: what was in force before and after."""

    action: str  # "promote" | "rollback"
    version: str
    previous: str | None
    at: float

    def to_dict(self) -> dict:
        return asdict(self)


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- reads --------------------------------------------------------------------------------
    def versions(self) -> list[ModelCard]:
        """Every registered version, oldest first."""
        base = self.root / "versions"
        if not base.is_dir():
            return []
        cards = [self._card(d) for d in base.iterdir() if (d / CARD).is_file()]
        return sorted(cards, key=lambda c: (c.created, c.version))

    def resolve(self, prefix: str) -> str:
        """The full version id that ``prefix`` names (unique prefix of a registered version)."""
        prefix = prefix.strip()
        if not prefix:
            raise RegistryError("empty version")
        hits = [c.version for c in self.versions() if c.version.startswith(prefix)]
        if not hits:
            raise RegistryError(f"no version {prefix!r} in {self.root} (see `linrec-stream models list`)")
        if len(hits) > 1:
            raise RegistryError(f"version prefix {prefix!r} is ambiguous: {', '.join(h[:12] for h in hits)}")
        return hits[0]

    def card(self, version: str) -> ModelCard:
        return self._card(self.path(self.resolve(version)))

    def path(self, version: str) -> Path:
        """The folder of a (full) version id."""
        return self.root / "versions" / version

    def current(self) -> str | None:
        """The version in force, or None before the first promotion."""
        f = self.root / CURRENT
        if not f.is_file():
            return None
        return json.loads(f.read_text())["version"]

    def history(self) -> list[Change]:
        f = self.root / HISTORY
        if not f.is_file():
            return []
        return [Change(**json.loads(line)) for line in f.read_text().splitlines() if line.strip()]

    # --- writes -------------------------------------------------------------------------------
    def add(self, run_dir: Path, origin: str = "train", **card: object) -> ModelCard:
        """Copy a run directory's model into ``versions/<version>`` with a card.

        The version, config and vocabulary size come from the checkpoint itself; ``card`` fills the
        other ModelCard fields (parent, decision, data, metrics, note). Adding a version that is
        already registered keeps the stored one (same id, same weights) and returns its card."""
        run_dir = Path(run_dir)
        try:
            model, _ = load_run(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise RegistryError(str(exc)) from None
        c = model.config
        full = ModelCard(version=model.version, created=time.time(), attention=c.attention,
                         num_items=c.num_items, config=c.to_dict(), origin=origin, **card)  # type: ignore[arg-type]
        target = self.path(full.version)
        if (target / CARD).is_file():
            return self._card(target)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        # Build the folder beside its final place, then rename: a reader never sees half a version.
        tmp = Path(tempfile.mkdtemp(prefix=f".{full.version[:12]}-", dir=self.root / "versions"))
        try:
            for f in run_dir.iterdir():
                if f.is_file() and f.name not in (RESUME_FILE, CARD):
                    shutil.copy2(f, tmp / f.name)
            (tmp / CARD).write_text(full.to_json())
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return full

    def promote(self, version: str) -> Change:
        """Make ``version`` (a unique prefix) the version in force."""
        full = self.resolve(version)
        return self._set_current(full, "promote")

    def rollback(self) -> Change:
        """Go back to the version that was in force before the current one."""
        current = self.current()
        if current is None:
            raise RegistryError(f"nothing to roll back: no version has been promoted in {self.root}")
        target = previous_version(self.history(), current)
        if target is None:
            raise RegistryError(f"nothing to roll back to: {current[:12]} was the first version in force")
        return self._set_current(target, "rollback")

    def _set_current(self, version: str, action: str) -> Change:
        missing = missing_files(self.path(version))
        if missing:
            raise RegistryError(f"version {version[:12]} is incomplete: {', '.join(missing)} missing")
        change = Change(action, version, self.current(), time.time())
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / CURRENT, json.dumps({"version": version, "since": change.at, "action": action}))
        with open(self.root / HISTORY, "a") as f:
            f.write(json.dumps(change.to_dict()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return change

    def _card(self, folder: Path) -> ModelCard:
        try:
            return ModelCard.from_dict(json.loads((folder / CARD).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise RegistryError(f"{folder / CARD}: unreadable model card ({exc})") from None


def previous_version(history: list[Change], current: str) -> str | None:
    """The version in force before ``current``, following rollbacks: rolling back twice goes
    back two steps, as an undo stack would (a rollback pops; a promotion pushes)."""
    stack: list[str] = []
    for ch in history:
        if ch.action == "rollback":
            while stack and stack[-1] != ch.version:
                stack.pop()
            if not stack:
                stack.append(ch.version)
        elif not stack or stack[-1] != ch.version:
            stack.append(ch.version)
    if not stack or stack[-1] != current:
        return None
    return stack[-2] if len(stack) >= 2 else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
