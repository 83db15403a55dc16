"""benchmarks/bench_batch.py on tiny sizes: its table, and that its two cases compute the same
thing (apply_batch's recommendations are the model-only path's top-k for the same users)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tests.conftest import load_script

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TINY = ["--users", "64", "--batch", "32", "--history", "8", "--seconds", "0.2"]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_batch.py")


@pytest.mark.parametrize("device", DEVICES)
def test_main_prints_the_table(bench, device, tmp_path, capsys):
    out = tmp_path / "bench_batch.json"
    rows = bench.main([*TINY, "--device", device, "--json", str(out)])
    printed = capsys.readouterr().out
    assert [(r.case.split(" (")[0], r.dtype) for r in rows] == [
        ("model-only ceiling", "-"), ("apply_batch", "float32"), ("apply_batch", "float16")]
    for r in rows:
        assert r.device == device and r.users >= 2 * 32 and r.batches >= 2
        for x in (r.users_per_s, r.ms_per_batch, r.x_ceiling):
            assert math.isfinite(x) and x > 0
        assert r.case in printed
    assert rows[0].x_ceiling == 1.0
    for r in rows[1:]:
        assert set(r.stage_ms) == set(bench.STAGES)
        assert all(math.isfinite(v) and v >= 0 for v in r.stage_ms.values())
    assert "machine:" in printed and torch.__version__ in printed
    saved = json.loads(out.read_text())
    assert [r["case"] for r in saved["rows"]] == [r.case for r in rows]


@pytest.mark.parametrize("device", DEVICES)
def test_apply_batch_gives_the_model_only_top_k(bench, device, tmp_path):
    """The same users, states and new items: apply_batch over the stored float32 records ranks
    exactly the items the ceiling's computation ranks (same masked window, same top 10)."""
    from consumers.batch import apply_batch
    from consumers.serving import ServingModel
    from linrec_stream.model.run_dir import load_run

    model, vocab = load_run(bench.make_model("linrec_decay", tmp_path, 200), device)
    serving = ServingModel.of(model, vocab, state_dtype="float32")
    window = 6  # shorter than the history: the window after the new item drops the oldest ids
    pop = bench.prefill(serving, 48, 8, 16)
    records = pop.records(serving, window)
    rng = random.Random(0)
    rows = rng.sample(range(48), 16)
    items = [rng.randrange(1, 201) for _ in rows]
    events = bench.events_for(serving, pop, rows, items, 0)
    result = apply_batch(serving, {e.user: records[e.user] for e in events}, events, bench.TOP_K, window)
    got = {rec.user: rec.items for rec in result.recommendations}
    b = bench.ceiling_batch(serving, pop, rows, items, window)
    assert b.seen.shape == (16, window)
    for form in bench.FORMS:
        vals, ids = bench.model_only(serving, b, form)
        want = {pop.names[r]: [vocab.items[i] for i in row] for r, row in zip(rows, ids.tolist())}
        assert got == want, form
        assert torch.isfinite(vals).all()
    # the masked window is the one apply_batch stores
    for rec, r, it in zip(result.records, rows, items):
        assert rec.window == (*pop.histories[r], it)[-window:]
