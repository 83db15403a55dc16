"""The fast attention forms against the naive loops (the specification), in float64 and float32."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from linrec_stream.model.ops import (
    OPS,
    KVCache,
    LinearState,
    StreamingUnsupported,
    chunked_form,
    masked_form,
    unit_elu,
)

STREAMABLE = [name for name, op in OPS.items() if op.streamable]
LINEAR = [name for name, op in OPS.items() if op.state_kind == "linear"]
FORMS = ["masked", "chunked", "auto"]


def make_qkv(B: int, H: int, T: int, d: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(3))


def left_pad_mask(pads: list[int], T: int) -> torch.Tensor:
    """(B, T) bool: row b has pads[b] padding slots on the left, then real events."""
    return torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]


def sample_log_decay(H: int, dtype=torch.float64) -> torch.Tensor:
    """log γ per head for ``linrec_decay`` tests: strong enough (γ 0.6 to 0.95) that a wrong
    exponent anywhere changes the outputs well beyond the tolerances."""
    return torch.log(torch.linspace(0.6, 0.95, H, dtype=dtype))


class op_:  # noqa: N801 - reads as OPS[name] at the call sites
    """``OPS[name]`` with the decay of ``linrec_decay`` bound (from the head count of q)."""

    def __init__(self, name: str) -> None:
        self._op = OPS[name]
        self.naive = self._bind(self._op.naive)
        self.recurrent = self._bind(self._op.recurrent)
        self.parallel = self._bind(self._op.parallel)

    def _bind(self, f):
        if not self._op.has_decay:
            return f

        def with_decay(q, *args, **kw):
            kw.setdefault("log_decay", sample_log_decay(q.shape[1], q.dtype))
            return f(q, *args, **kw)

        return with_decay


def parallel(name: str, form: str, chunk_size: int = 4):
    fn, linear = op_(name).parallel, OPS[name].state_kind == "linear"

    def f(*args, **kw):
        if linear:
            kw.update(form=form, chunk_size=chunk_size)
        return fn(*args, **kw)

    return f


def fast_forms(name: str):
    """Every fast form of a variant (chunk size 4 so that short tests cross chunk borders)."""
    forms = {f"parallel-{form}": parallel(name, form) for form in FORMS}
    forms["recurrent"] = op_(name).recurrent
    return forms


def prefix_state(name: str, B: int, H: int, d: int, T0: int = 5, seed: int = 1):
    """A realistic state: what the naive loop returns after T0 events (some rows padded)."""
    q, k, v = make_qkv(B, H, T0, d, seed=seed)
    mask = left_pad_mask([(b * 2) % T0 for b in range(B)], T0)
    return op_(name).naive(q, k, v, None, True, mask=mask)[1]


def assert_close(a, b, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def assert_states_close(a, b, **kw):
    assert type(a) is type(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            if x.dtype == torch.bool or x.dtype == torch.int64:
                assert torch.equal(x, y)
            else:
                assert_close(x, y, **kw)


@pytest.mark.parametrize("name", STREAMABLE)
@pytest.mark.parametrize("B,H,T,d", [(1, 1, 1, 2), (2, 2, 7, 4), (3, 1, 13, 8), (2, 3, 16, 3)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_fast_forms_match_naive(name, B, H, T, d, padded, with_state):
    q, k, v = make_qkv(B, H, T, d)
    mask = left_pad_mask([(3 * b) % T for b in range(B)], T) if padded else None
    s0 = prefix_state(name, B, H, d) if with_state else None
    o_ref, s_ref = op_(name).naive(q, k, v, s0, True, mask=mask)
    for form, f in fast_forms(name).items():
        o, s = f(q, k, v, s0, True, mask=mask)
        assert o.shape == (B, H, T, d), form
        assert_close(o, o_ref)
        assert_states_close(s, s_ref)
        o_only, none = f(q, k, v, s0, False, mask=mask)
        assert none is None
        assert_close(o_only, o_ref)


@pytest.mark.parametrize("name", STREAMABLE)
def test_padding_gives_zero_output_and_leaves_state(name):
    q, k, v = make_qkv(2, 2, 6, 4)
    s0 = prefix_state(name, 2, 2, 4)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for f in fast_forms(name).values():
        o, s = f(q, k, v, s0, True, mask=mask)
        assert torch.count_nonzero(o) == 0
        if name == "softmax":  # the cache gains slots, all marked as padding
            assert not s.mask[:, -6:].any()
            assert_close(s.k[:, :, :5], s0.k)
        else:
            assert_states_close(s, s0)


@pytest.mark.parametrize("name", STREAMABLE)
def test_left_padding_equals_real_events_alone(name):
    # Row 1 is row 0's last 5 events, padded on the left: its real outputs must not change.
    q, k, v = make_qkv(1, 2, 9, 4)
    q2, k2, v2 = (torch.cat([x, torch.cat([torch.randn_like(x[..., :4, :]), x[..., 4:, :]], 2)]) for x in (q, k, v))
    mask = left_pad_mask([0, 4], 9)
    o_alone, _ = op_(name).naive(q[..., 4:, :], k[..., 4:, :], v[..., 4:, :])
    for f in fast_forms(name).values():
        o, _ = f(q2, k2, v2, mask=mask)
        assert_close(o[1, :, 4:], o_alone[0])


@pytest.mark.parametrize("name", STREAMABLE)
@pytest.mark.parametrize("split", [0, 1, 5, 12])
def test_split_and_resume_equals_one_call(name, split):
    q, k, v = make_qkv(2, 2, 12, 4)
    mask = left_pad_mask([0, 3], 12)
    for form, f in fast_forms(name).items():
        o_full, s_full = f(q, k, v, None, True, mask=mask)
        o1, s1 = f(q[:, :, :split], k[:, :, :split], v[:, :, :split], None, True, mask=mask[:, :split])
        # resume with a different form than the first half: parallel then recurrent and back
        g = op_(name).recurrent if form.startswith("parallel") else parallel(name, "chunked")
        o2, s2 = g(q[:, :, split:], k[:, :, split:], v[:, :, split:], s1, True, mask=mask[:, split:])
        assert_close(torch.cat([o1, o2], dim=2), o_full)
        if name == "softmax":
            assert_close(s2.k, s_full.k)
            assert torch.equal(s2.mask, s_full.mask)
        else:
            assert_states_close(s2, s_full)


@pytest.mark.parametrize("name", STREAMABLE)
@pytest.mark.parametrize("form", FORMS)
def test_parallel_gradients_match_naive(name, form):
    B, H, T, d = 2, 2, 10, 4
    q, k, v = (x.requires_grad_() for x in make_qkv(B, H, T, d))
    mask = left_pad_mask([0, 3], T)
    w = torch.randn(B, H, T, d, dtype=torch.float64)
    s0 = prefix_state(name, B, H, d)
    leaves = [q, k, v]
    if name != "softmax":  # gradients must also flow into the state a sequence starts from
        s0 = LinearState(*(x.clone().requires_grad_() if x is not None and x.is_floating_point() else x for x in s0))
        leaves += [x for x in s0 if x is not None and x.requires_grad]

    def grads(f):
        o, s = f(q, k, v, s0, True, mask=mask)
        loss = (o * w).sum() + sum((x.sum() for x in s if x is not None and x.is_floating_point()))
        return torch.autograd.grad(loss, leaves)

    for g_fast, g_ref in zip(grads(parallel(name, form)), grads(op_(name).naive)):
        assert torch.isfinite(g_fast).all()
        assert_close(g_fast, g_ref)


@pytest.mark.parametrize("name", STREAMABLE)
def test_float32_within_1e4_of_float64_spec(name):
    q, k, v = make_qkv(2, 2, 300, 16)
    mask = left_pad_mask([0, 17], 300)
    o_ref, _ = op_(name).naive(q, k, v, mask=mask)
    for form, f in fast_forms(name).items():
        if form == "recurrent" and name == "softmax":
            continue  # same arithmetic as the naive loop; 300 steps over a growing cache is slow
        o, _ = f(*(x.float() for x in (q, k, v)), mask=mask)
        rel = (o.double() - o_ref).norm() / o_ref.norm()
        assert rel < 1e-5, (form, rel.item())


@given(
    data=st.data(),
    name=st.sampled_from(STREAMABLE),
    T=st.integers(1, 20),
    B=st.integers(1, 3),
    d=st.integers(1, 5),
    chunk=st.integers(1, 8),
)
@settings(max_examples=40, deadline=None)
def test_hypothesis_lengths_and_paddings(data, name, T, B, d, chunk):
    pads = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    q, k, v = make_qkv(B, 2, T, d, seed=T * 31 + d)
    mask = left_pad_mask(pads, T)
    o_ref, s_ref = op_(name).naive(q, k, v, None, True, mask=mask)
    forms = {"chunked": parallel(name, "chunked", chunk), "masked": parallel(name, "masked")}
    forms["recurrent"] = op_(name).recurrent
    for f in forms.values():
        o, s = f(q, k, v, None, True, mask=mask)
        assert_close(o, o_ref)
        assert_states_close(s, s_ref)


def test_bidir_matches_official_and_has_no_streaming_form():
    q, k, v = make_qkv(2, 2, 9, 4)
    op = OPS["linrec_bidir"]
    mask = left_pad_mask([0, 4], 9)
    o, s = op.parallel(q, k, v, mask=mask)
    assert s is None
    assert_close(o, op.naive(q, k, v)[0])
    # bidirectional: the first output depends on the last event; padding is not masked out
    o2, _ = op.parallel(q, k, v + (torch.arange(9) == 8)[:, None].double(), mask=mask)
    assert not torch.allclose(o2[:, :, 0], o[:, :, 0])
    with pytest.raises(StreamingUnsupported, match="no one-event form"):
        op.recurrent(q, k, v)
    with pytest.raises(StreamingUnsupported, match="no recurrent state"):
        op.parallel(q, k, v, None, True)


def test_chunked_form_never_builds_a_state_per_event():
    """No intermediate of the chunked form is as large as a (B, H, N, d, d) tensor."""
    B, H, N, d, C = 2, 2, 256, 16, 32
    q, k, v = make_qkv(B, H, N, d, dtype=torch.float32)
    sizes: list[int] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with Record():
        o, _ = chunked_form(q, k, v, None, True, chunk_size=C)
    assert sizes and max(sizes) < B * H * N * d * d / 4
    assert max(sizes) <= max(B * H * N * C, B * H * (N // C) * d * d)
    # the recorded run computed the right thing
    o_ref, _ = masked_form(*(x.double() for x in (q, k, v)))
    assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)


def test_auto_form_follows_the_crossover(monkeypatch):
    import linrec_stream.model.ops.kernels as kernels

    calls = []
    monkeypatch.setattr(kernels, "masked_form", lambda *a: calls.append("masked") or (a[0], None))
    monkeypatch.setattr(kernels, "chunked_form", lambda *a: calls.append("chunked") or (a[0], None))
    q = torch.zeros(1, 1, kernels.MASKED_MAX_LEN, 2)
    kernels.parallel_form(q, q, q)
    q = torch.zeros(1, 1, kernels.MASKED_MAX_LEN + 1, 2)
    kernels.parallel_form(q, q, q)
    assert calls == ["masked", "chunked"]
    with pytest.raises(ValueError, match="form must be"):
        kernels.parallel_form(q, q, q, form="blocked")


def test_softmax_cache_grows_by_one_slot_per_event():
    q, k, v = make_qkv(2, 2, 3, 4)
    _, s = OPS["softmax"].recurrent(q, k, v, None, True)
    assert isinstance(s, KVCache) and s.k.shape == (2, 2, 3, 4) and s.mask.all()
    _, s = OPS["softmax"].recurrent(q[:, :, :1], k[:, :, :1], v[:, :, :1], s, True)
    assert s.k.shape[2] == 4


# --- linrec_decay ---------------------------------------------------------------------------


def test_decay_zero_is_linrec_and_strong_decay_keeps_only_the_last_event():
    q, k, v = make_qkv(2, 3, 10, 4)
    mask = left_pad_mask([0, 2], 10)
    for form in FORMS:
        f = parallel("linrec_decay", form)
        o_none, _ = f(q, k, v, mask=mask, log_decay=torch.zeros(3, dtype=q.dtype))
        assert_close(o_none, parallel("linrec", form)(q, k, v, mask=mask)[0])
        # γ = e^-60: every earlier event is forgotten, o_t = q̂_t·k̂_t v_t / √d.
        o_last, _ = f(q, k, v, mask=mask, log_decay=torch.full((3,), -60.0, dtype=q.dtype))
        weight = (unit_elu(q) * unit_elu(k)).sum(-1, keepdim=True) / 2.0  # q̂_t·k̂_t / √d, d = 4
        expect = torch.where(mask[:, None, :, None], weight * v, 0.0)
        assert_close(o_last, expect)


def test_decay_padding_does_not_decay_the_state():
    # Padding in the middle of a row must neither add to nor shrink the state.
    q, k, v = make_qkv(1, 2, 8, 4)
    mask = torch.tensor([[True, True, True, False, False, True, True, True]])
    keep = mask[0]
    o_gap, s_gap = op_("linrec_decay").naive(q, k, v, None, True, mask=mask)
    o_alone, s_alone = op_("linrec_decay").naive(q[:, :, keep], k[:, :, keep], v[:, :, keep], None, True)
    for f in fast_forms("linrec_decay").values():
        o, s = f(q, k, v, None, True, mask=mask)
        assert_close(o[:, :, keep], o_alone)
        assert_close(o, o_gap)
        assert_close(s.S, s_alone.S)


@pytest.mark.parametrize("form", FORMS)
def test_decay_gradient_matches_naive(form):
    q, k, v = make_qkv(2, 2, 11, 3)
    mask = left_pad_mask([0, 3], 11)
    s0 = prefix_state("linrec_decay", 2, 2, 3)

    def grad_of_decay(f):
        ld = sample_log_decay(2).requires_grad_(True)
        o, s = f(q, k, v, s0, True, mask=mask, log_decay=ld)
        (o.square().sum() + s.S.sum()).backward()
        return ld.grad

    g_ref = grad_of_decay(OPS["linrec_decay"].naive)
    assert g_ref.abs().min() > 1e-3  # the loss does depend on both heads' decay
    assert_close(grad_of_decay(parallel("linrec_decay", form)), g_ref)
    assert_close(grad_of_decay(OPS["linrec_decay"].recurrent), g_ref)


def test_decay_forms_demand_one_rate_per_head():
    q, k, v = make_qkv(1, 3, 4, 2)
    for f in (OPS["linrec_decay"].parallel, OPS["linrec_decay"].recurrent):
        with pytest.raises(ValueError, match=r"log_decay of shape \(3,\)"):
            f(q, k, v)
        with pytest.raises(ValueError, match=r"log_decay of shape \(3,\)"):
            f(q, k, v, log_decay=torch.zeros(2, dtype=q.dtype))


@pytest.mark.parametrize("name", LINEAR)
def test_no_event_returns_the_initial_state(name):
    q, k, v = make_qkv(2, 2, 0, 4)
    s0 = prefix_state(name, 2, 2, 4)
    for f in fast_forms(name).values():
        o, s = f(q, k, v, s0, True)
        assert o.shape == (2, 2, 0, 4)
        assert_states_close(s, s0)


def test_naive_decay_spec_demands_its_decay():
    q, k, v = make_qkv(1, 2, 3, 2)
    with pytest.raises(ValueError, match="log_decay"):
        OPS["linrec_decay"].naive(q, k, v)
