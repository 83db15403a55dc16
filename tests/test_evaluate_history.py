"""evaluate(history="full"): the whole history, as a stream worker's state holds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linrec_stream.training.evaluate import EvalSet, batch_ranges, evaluate
from linrec_stream.training.metrics import RankingMetrics, exclude_history, full_ranks
from linrec_stream.model import LinRecModel, ModelConfig

ITEMS = 30


def make(attention: str, max_len: int = 6) -> LinRecModel:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=ITEMS, hidden_size=16, num_layers=2, num_heads=2, attention=attention,
                      max_len=max_len, dropout=0.0)
    return LinRecModel(cfg).double().eval()


def eval_set(lengths: list[int], seed: int = 0) -> EvalSet:
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(1, ITEMS + 1, n).astype(np.int64) for n in lengths]
    return EvalSet(inputs, rng.integers(1, ITEMS + 1, len(lengths)).astype(np.int64))


def test_token_batches_cover_every_user_in_order_within_the_budget():
    inputs = [np.ones(n, np.int64) for n in [3, 5, 2, 40, 1, 1, 7]]
    got = batch_ranges(inputs, batch_size=99, max_tokens=12)
    assert got[0][0] == 0 and got[-1][1] == len(inputs)
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    for start, stop in got:
        longest = max(len(s) for s in inputs[start:stop])
        assert (stop - start) * longest <= 12 or stop - start == 1
    assert (3, 4) in got  # the 40-event user alone
    assert batch_ranges(inputs, batch_size=3, max_tokens=None) == [(0, 3), (3, 6), (6, 7)]
    # Short histories: the user count is capped by batch_size as well.
    assert batch_ranges([np.ones(1, np.int64)] * 7, batch_size=3, max_tokens=100) == [(0, 3), (3, 6), (6, 7)]


@pytest.mark.parametrize("attention", ["linrec", "linrec_decay", "softmax"])
def test_full_history_equals_stepping_every_event_like_the_worker(attention):
    model = make(attention)
    data = eval_set([2, 6, 9, 17, 40])  # most longer than max_len = 6
    expect = RankingMetrics()
    for seq, target in zip(data.inputs, data.targets):
        state, h = model.init_state(1), None
        for item in seq:
            h, state = model.step(state, torch.tensor([int(item)]))
        scores = model.score(h).float()
        t = torch.tensor([int(target)])
        expect.add(full_ranks(exclude_history(scores, torch.from_numpy(seq)[None], t), t))
        if len(seq) > model.config.max_len:
            # The window protocol sees fewer events: its state (and so its scores) differ.
            h_window = model(torch.from_numpy(seq[-model.config.max_len:])[None])[0, -1]
            assert not torch.allclose(h_window, h[0], atol=1e-6)
    got = evaluate(model, data, history="full", batch_size=2)
    assert got == pytest.approx(expect.result(), abs=1e-12)


@pytest.mark.parametrize("attention", ["linrec", "linrec_decay", "softmax"])
def test_full_equals_window_when_no_history_exceeds_max_len(attention):
    model = make(attention, max_len=20)
    data = eval_set([1, 5, 20, 11])
    assert evaluate(model, data, history="full") == evaluate(model, data, history="window")


def test_unknown_history_is_refused():
    with pytest.raises(ValueError, match="history must be one of"):
        evaluate(make("linrec"), eval_set([3]), history="all")
