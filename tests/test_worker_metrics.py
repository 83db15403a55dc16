"""The worker's metrics observer (consumers/metrics.py): one batch result in, every series and
summary figure it drives updated."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from consumers.batch import BatchResult
from consumers.metrics import WorkerMetrics
from linrec_stream.contracts.events import Recommendation, Rejected, Source


def rec(user: str, kafka_ts_ms: int, trigger: str) -> Recommendation:
    return Recommendation(user, ["i1"], [0.1], "v1", Source("in", 0, 1, kafka_ts_ms), None, 1e9, time.time(), trigger)


def test_a_micro_batch_and_a_sweep_step_feed_the_same_series():
    m = WorkerMetrics()
    two_seconds_ago = int(time.time() * 1000) - 2000
    batch = BatchResult([], [rec("a", two_seconds_ago, "event")], applied=5, duplicates=2, unknown_items=1)
    bad = [Rejected("invalid_json", "", None, b"{", Source("in", 0, 9, -1))]
    m.observe_batch_result(batch, bad, {"parse": 0.25, "produce": 0.5}, consumed=12, forwarded=4)
    sweep = BatchResult([], [rec("b", -1, "model_swap"), rec("c", -1, "model_swap")], rebuilt=3)
    m.observe_batch_result(sweep)
    assert m.totals == {"events": 5, "forwarded": 4, "dead_letters": 1, "recommendations": 3, "duplicates": 2,
                        "unknown_items": 1, "batches": 1}
    assert m.stage_seconds == {"parse": 0.25, "produce": 0.5}
    # Latency only for the recommendation an event triggered (a swap's has no ingest time).
    p50, p99 = m.latency_quantiles()
    assert 1.9 < p50 == p99 < 10
    text = generate_latest(m.registry).decode()
    assert "4 forwarded to their home partition" in m.summary(0)
    for line in ('linrec_events_total{outcome="applied"} 5.0', 'linrec_events_total{outcome="duplicate"} 2.0',
                 'linrec_events_total{outcome="forwarded"} 4.0',
                 'linrec_dead_letters_total{reason="invalid_json"} 1.0', "linrec_recommendations_total 3.0",
                 "linrec_states_rebuilt_total 3.0", "linrec_batch_events_count 1.0",
                 "linrec_end_to_end_seconds_count 1.0"):
        assert line in text, line


def test_a_swap_moves_the_model_gauge_and_lag_is_summed():
    m = WorkerMetrics()
    m.observe_model("v1")
    m.observe_model("v2", previous="v1")
    text = generate_latest(m.registry).decode()
    assert 'linrec_model_info{version="v1"} 0.0' in text and 'linrec_model_info{version="v2"} 1.0' in text
    assert "linrec_model_swaps_total 1.0" in text
    assert m.observe_lag({0: 3, 2: 4}) == 7
    assert 'linrec_consumer_lag{partition="2"} 4.0' in generate_latest(m.registry).decode()
