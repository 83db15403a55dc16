"""Readers for interaction logs: (user, item, timestamp) triples.

Three formats are understood:

* ``inter``: RecBole atomic files. Tab separated, a typed header such as
  ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``; the user, item and
  timestamp columns are found by name, other columns are ignored. No quoting (RecBole has none).
* ``dat``: raw MovieLens ``ratings.dat``, ``UserID::MovieID::Rating::Timestamp``, no header.
* ``csv``: a plain CSV/TSV log. The delimiter (tab, comma or semicolon) is detected from the first
  line. With a header, the columns are found by name (user / user_id / userId / uid, item /
  item_id / movieId / iid, timestamp / ts / time); without one, exactly three columns
  ``user, item, timestamp`` are expected. Quoted fields are allowed (csv module).

Line ends may be LF or CRLF. Empty lines are ignored. Every other line must have the expected
number of fields, a non-empty user and item, and a finite numeric timestamp; otherwise it is
malformed: a :class:`DataError` naming the file and line, or skipped and counted.

Reading is vectorised where it matters (one ``str.split`` per line, numpy for the timestamps,
the garbage collector paused), so ML-1M's million rows take about two seconds; the per-row
checks that give exact line numbers only run when the fast path finds a problem.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

FORMATS = ("auto", "inter", "dat", "csv")

# Normalised column names (lower case, no "_", "-" or spaces) accepted for each role.
_USER_NAMES = ("user", "userid", "uid", "users")
_ITEM_NAMES = ("item", "itemid", "iid", "movieid", "movie", "items")
_TS_NAMES = ("timestamp", "ts", "time")


class DataError(ValueError):
    """A data file that cannot be used. The message is one line, e.g.
    ``path/x.csv:17: expected 3 fields, got 2``."""


class MissingDataError(DataError):
    """The file or data set named does not exist: a wrong argument (the CLI's exit code 2)."""


@dataclass(frozen=True, eq=False)
class Interactions:
    """An interaction log in file order.

    Attributes:
        user: shape (N,), dtype object, user ids as str.
        item: shape (N,), dtype object, item ids as str.
        ts: shape (N,), float64, timestamps (epoch seconds for the MovieLens files; any
            monotone numeric clock works, only the order matters downstream).
        source: where it was read from (the path as given).
        skipped: number of malformed lines skipped (0 unless ``skip_malformed=True``).
    """

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.user.shape[0])


def read_interactions(path: str | Path, fmt: str = "auto", skip_malformed: bool = False) -> Interactions:
    """Read an interaction log.

    Args:
        path: the file.
        fmt: ``"inter"``, ``"dat"``, ``"csv"`` (also TSV) or ``"auto"`` (by extension, then
            by the first line's content).
        skip_malformed: skip malformed lines and count them in ``Interactions.skipped``
            instead of raising.

    Raises:
        DataError: missing/unreadable file, unknown format, bad header, or a malformed line
            (the first one, with its line number) when ``skip_malformed`` is False.
    """
    name = str(path)
    if fmt not in FORMATS:
        raise DataError(f"{name}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    with _gc_paused():
        return _read(Path(path), name, fmt, skip_malformed)


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: a million small lists (one per split line) would
    otherwise trigger it hundreds of times for nothing (ML-1M: 2.5 s -> 0.6 s to split)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read(p: Path, name: str, fmt: str, skip_malformed: bool) -> Interactions:
    text = _read_text(p, name)
    if fmt == "auto":
        fmt = _sniff(p, text)
    if fmt == "csv":
        return _read_csv(name, text, skip_malformed)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if fmt == "dat":
        return _validate(name, [ln.split("::") for ln in lines], 1, 4, (0, 1, 3),
                         skip_malformed, strip=False)
    # inter: first non-empty line is the typed header.
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        return _empty(name)
    header = [h.split(":", 1)[0] for h in lines[first].split("\t")]
    cols = _find_columns(name, first + 1, header)
    if cols is None:
        raise DataError(f"{name}:{first + 1}: header {lines[first].strip()!r} has no "
                        "user_id, item_id and timestamp columns")
    body = lines[first + 1:]
    return _validate(name, [ln.split("\t") for ln in body], first + 2, len(header), cols,
                     skip_malformed, strip=False)


# --- helpers ----------------------------------------------------------------------------------

def _read_text(p: Path, name: str) -> str:
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not a file") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark from spreadsheet exports
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 text") from None
    # CRLF -> LF once for the whole file, cheaper than stripping each line.
    return text.replace("\r\n", "\n") if "\r" in text else text


def _sniff(p: Path, text: str) -> str:
    ext = p.suffix.lower()
    if ext == ".inter":
        return "inter"
    if ext == ".dat":
        return "dat"
    first = next((ln for ln in text[:1 << 16].split("\n") if ln.strip()), "")
    if "::" in first:
        return "dat"
    fields = first.split("\t")
    if len(fields) > 1 and all(":" in f for f in fields):  # typed RecBole header
        return "inter"
    return "csv"


def _norm(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch not in "_- ")


def _find_columns(name: str, line_no: int, header: Sequence[str]) -> tuple[int, int, int] | None:
    """Indices of the (user, item, timestamp) columns in a header, or None if one is missing."""
    normed = [_norm(h) for h in header]
    found = []
    for role in (_USER_NAMES, _ITEM_NAMES, _TS_NAMES):
        idx = [i for i, h in enumerate(normed) if h in role]
        if not idx:
            return None
        if len(idx) > 1:
            raise DataError(f"{name}:{line_no}: ambiguous header, columns "
                            f"{', '.join(repr(header[i]) for i in idx)} all look like the same field")
        found.append(idx[0])
    return found[0], found[1], found[2]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_csv(name: str, text: str, skip: bool) -> Interactions:
    first = next((ln for ln in text[:1 << 16].split("\n") if ln.strip()), None)
    if first is None:
        return _empty(name)
    # Tab wins over comma: TSV fields (e.g. titles) often contain commas, rarely tabs.
    delim = "\t" if "\t" in first else "," if "," in first else ";" if ";" in first else None
    if delim is None:
        raise DataError(f"{name}:1: cannot tell the delimiter (expected tab, comma or semicolon)")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, skipinitialspace=True)
    rows: list[list[str]] = []
    line_nos: list[int] = []
    try:
        for row in reader:
            rows.append(row)
            line_nos.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: {e}") from None
    start = next((i for i, r in enumerate(rows) if any(f.strip() for f in r)), None)
    if start is None:
        return _empty(name)
    head = [f.strip() for f in rows[start]]
    cols = _find_columns(name, line_nos[start], head)
    if cols is not None:
        n_fields, body, body_lines = len(head), rows[start + 1:], line_nos[start + 1:]
    elif len(head) >= 3 and not _is_number(head[2]):
        # A header we do not understand is an error even when skipping: skipping it would
        # silently read the columns in the wrong roles.
        raise DataError(f"{name}:{line_nos[start]}: header {','.join(head)!r} names no user, item "
                        "and timestamp columns (accepted: user/user_id, item/item_id, timestamp/ts)")
    else:
        # No header: positional user, item, timestamp.
        n_fields, cols, body, body_lines = 3, (0, 1, 2), rows[start:], line_nos[start:]
    return _validate(name, body, body_lines, n_fields, cols, skip, strip=True)


def _empty(name: str) -> Interactions:
    return Interactions(np.empty(0, dtype=object), np.empty(0, dtype=object),
                        np.empty(0, dtype=np.float64), name, 0)


def _validate(name: str, rows: list[list[str]], line_nos: int | list[int], n_fields: int,
              cols: tuple[int, int, int], skip: bool, strip: bool) -> Interactions:
    """Turn split rows into an Interactions, checking every row.

    ``line_nos`` is either the 1-based line number of ``rows[0]`` (rows are consecutive lines)
    or a list with one line number per row (CSV, where a quoted field may span lines).
    """
    ui, ii, ti = cols
    fast = _fast(rows, n_fields, ui, ii, ti, strip)
    if fast is not None:
        user, item, ts = fast
        return Interactions(user, item, ts, name, 0)
    # Slow path: something is off; find out which rows, with line numbers.
    users: list[str] = []
    items: list[str] = []
    tss: list[float] = []
    skipped = 0
    for k, row in enumerate(rows):
        if strip:
            row = [f.strip() for f in row]
        if not any(f.strip() for f in row):
            continue  # empty line
        problem = _problem(row, n_fields, ui, ii, ti)
        if problem is None:
            users.append(row[ui])
            items.append(row[ii])
            tss.append(float(row[ti]))
            continue
        if not skip:
            line = line_nos + k if isinstance(line_nos, int) else line_nos[k]
            raise DataError(f"{name}:{line}: {problem}")
        skipped += 1
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object),
                        np.array(tss, dtype=np.float64), name, skipped)


def _problem(row: list[str], n_fields: int, ui: int, ii: int, ti: int) -> str | None:
    """Why a (non-empty) row is malformed, or None if it is fine."""
    if len(row) != n_fields:
        return f"expected {n_fields} fields, got {len(row)}"
    if not row[ui].strip():
        return "empty user id"
    if not row[ii].strip():
        return "empty item id"
    try:
        t = float(row[ti])
    except ValueError:
        return f"timestamp {row[ti]!r} is not a number"
    if not math.isfinite(t):
        return f"timestamp {row[ti]!r} is not finite"
    return None


def _fast(rows: list[list[str]], n_fields: int, ui: int, ii: int, ti: int, strip: bool):
    """Columns as arrays if every row is well formed, else None (then the slow path runs)."""
    if any(len(r) != n_fields for r in rows):
        return None
    if strip:
        user = [r[ui].strip() for r in rows]
        item = [r[ii].strip() for r in rows]
    else:
        user = [r[ui] for r in rows]
        item = [r[ii] for r in rows]
    # `not s.strip()` also catches whitespace-only ids; cheap next to the split.
    if not all(map(str.strip, user)) or not all(map(str.strip, item)):
        return None
    try:
        ts = np.array([r[ti] for r in rows], dtype=np.float64)
    except ValueError:
        return None
    if not np.isfinite(ts).all():
        return None
    return np.array(user, dtype=object), np.array(item, dtype=object), ts
