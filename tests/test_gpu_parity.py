"""benchmarks/gpu_parity.py, the accelerator check, run here on the CPU so it cannot rot
between GPU leases: it must pass on a correct model and catch a broken one-event form."""

from __future__ import annotations

import pytest
import torch

from linrec_stream.model import LinRecModel
from tests.conftest import load_script

SCRIPT = "benchmarks/gpu_parity.py"


def test_forms_agree_on_cpu_beyond_max_len():
    err = load_script(SCRIPT).check("linrec_decay", "cpu", B=2, T=210, split=70)
    assert set(err) == {"forward masked", "forward chunked", "encode split", "step loop"}
    assert max(err.values()) < 2e-4, err


def test_a_wrong_step_fails_the_check(monkeypatch):
    real_step = LinRecModel.step

    def off_by_a_little(self, state, items):
        h, state = real_step(self, state, items)
        return h + 1e-3, state

    monkeypatch.setattr(LinRecModel, "step", off_by_a_little)
    err = load_script(SCRIPT).check("linrec", "cpu", B=2, T=20, split=7)
    assert err["step loop"] > 2e-4
    assert err["encode split"] < 2e-4


def test_refuses_cuda_without_a_gpu(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("the refusal only exists where there is no GPU")
    monkeypatch.setattr("sys.argv", ["gpu_parity.py", "--device", "cuda"])
    assert load_script(SCRIPT).main() == 2
    assert "no CUDA device" in capsys.readouterr().err
