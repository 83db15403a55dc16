"""The chaos soak's short form (issue 19): two workers in one group on a private broker, a log
with malformed and poison messages produced while a controller kills workers (kill -9), restarts
the broker and wipes a worker's state directory; at the end nothing is lost, nothing doubled, every
state and recommendation is right and every malformed message is dead-lettered. The long form:
`.venv/bin/python -m tests.chaos --seconds 600` (see tests/chaos.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import MIN_FAULTS, run_soak

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.mark.timeout(420)
def test_a_chaos_soak_loses_and_doubles_nothing(tmp_path: Path):
    report = run_soak(tmp_path, seconds=90, seed=19)
    assert len(report.injected) >= MIN_FAULTS
    assert {f.kind for f in report.injected} == {"worker_kill", "broker_restart", "worker_wipe"}
    report.assert_ok()
