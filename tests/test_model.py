"""LinRecModel: the parallel and one-event forms agree; states stack, split and serialise."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linrec_stream.model import LinRecModel, ModelConfig, UserState
from linrec_stream.model.ops import StreamingUnsupported
from linrec_stream.model.user_state import HEADER_SIZE, StateFormatError, StateMismatchError

STREAMABLE = ["linrec", "linrec_decay", "linrec_seqnorm", "linear", "softmax"]
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def small_config(attention: str = "linrec", **kw) -> ModelConfig:
    base = dict(num_items=40, hidden_size=16, num_layers=2, num_heads=2, attention=attention, max_len=8, dropout=0.2)
    base.update(kw)
    return ModelConfig(**base)


def make_model(cfg: ModelConfig, dtype=torch.float64, seed: int = 0) -> LinRecModel:
    torch.manual_seed(seed)
    return LinRecModel(cfg).to(dtype).eval()


def left_padded(lengths: list[int], N: int, num_items: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (len(lengths), N), generator=g)
    for b, n in enumerate(lengths):
        seq[b, : N - n] = 0
    return seq


def stepped_real_items(model: LinRecModel, seq: torch.Tensor) -> torch.Tensor:
    """Each user alone: step only its real items from init_state; (B, N, D), 0 at padding."""
    out = torch.zeros(*seq.shape, model.config.hidden_size, dtype=model.dtype)
    for b in range(seq.shape[0]):
        state = model.init_state(1)
        for t in (seq[b] != 0).nonzero().flatten().tolist():
            h, state = model.step(state, seq[b, t : t + 1])
            out[b, t] = h[0]
    return out


def max_rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max over real positions of ‖a − b‖ / ‖b‖ (hidden vectors)."""
    err = (a - b).norm(dim=-1) / b.norm(dim=-1)
    return err[mask].max().item()


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_items", 0),
        ("hidden_size", -4),
        ("num_layers", 0),
        ("num_heads", 3),  # 16 not divisible by 3
        ("attention", "flash"),
        ("max_len", 0),
        ("dropout", 1.0),
        ("attn_dropout", -0.1),
        ("inner_size", 2.5),
        ("layer_norm_eps", 0),
        ("positions", "rotary"),
        ("parallel_form", "blocked"),
        ("chunk_size", True),
    ],
)
def test_config_rejects_bad_fields_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_config_round_trips_through_dict_and_rejects_unknown_keys():
    cfg = ModelConfig(num_items=3706, hidden_size=64, num_layers=2, num_heads=2, attention="linrec", max_len=200, dropout=0.2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})


# --- API ---------------------------------------------------------------------------------------


def test_public_api_shapes_and_dtypes():
    cfg = ModelConfig(num_items=3706, hidden_size=64, num_layers=2, num_heads=2, attention="linrec", max_len=200, dropout=0.2)
    model = LinRecModel(cfg).eval()
    seq = left_padded([5, 12], 12, cfg.num_items)
    h = model(seq)
    assert h.shape == (2, 12, 64) and h.dtype == torch.float32
    assert torch.count_nonzero(h[0, :7]) == 0  # padding slots
    state = model.init_state(2)
    assert state.S.dtype == torch.float32 and state.S.shape == (2, 2, 2, 32, 32)
    h_t, state = model.step(state, torch.tensor([3, 7]))
    assert h_t.shape == (2, 64) and state.num_events.tolist() == [1, 1]
    scores = model.score(h_t)
    assert scores.shape == (2, 3707)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    assert scores.argmax(-1).min() >= 1
    model.double()
    assert model.init_state(1).S.dtype == torch.float64
    assert model(seq).dtype == torch.float64


def test_training_mode_applies_dropout_and_gradients_are_finite_with_padding():
    for attention in STREAMABLE + ["linrec_bidir"]:
        model = make_model(small_config(attention), torch.float32).train()
        seq = left_padded([0, 3, 10], 10, 40)  # row 0 is all padding
        h1 = model(seq)
        assert not torch.equal(h1, model(seq)), attention  # dropout is active
        loss = torch.nn.functional.cross_entropy(model.score(h1[:, -1])[1:], torch.tensor([1, 2]))
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (attention, name)
        assert model.blocks[0].attention.query.weight.grad.abs().sum() > 0


# --- the two forms agree -----------------------------------------------------------------------


@pytest.mark.parametrize("attention", STREAMABLE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["auto", "masked", "chunked"])
def test_step_equals_parallel_up_to_3x_max_len(attention, dtype, form):
    cfg = small_config(attention, parallel_form=form, chunk_size=5)
    model = make_model(cfg, dtype)
    N = 3 * cfg.max_len
    seq = left_padded([N, N - 1, 13, 1], N, cfg.num_items)
    h = model(seq)
    stepped = stepped_real_items(model, seq)
    assert max_rel_err(stepped, h, seq != 0) < TOL[dtype]
    assert torch.count_nonzero(h[seq == 0]) == 0


@pytest.mark.parametrize("attention", STREAMABLE)
@pytest.mark.parametrize("hidden,heads,layers", [(12, 3, 1), (16, 1, 2), (8, 4, 3)])
@pytest.mark.parametrize("batch", [1, 3])
def test_step_equals_parallel_across_heads_and_head_sizes(attention, hidden, heads, layers, batch):
    cfg = small_config(attention, hidden_size=hidden, num_heads=heads, num_layers=layers, max_len=4)
    model = make_model(cfg)
    N = 10
    seq = left_padded([N - 3 * b for b in range(batch)], N, cfg.num_items, seed=hidden)
    # stepping the whole padded batch at once (padding items are no-ops) ...
    state, outs = model.init_state(batch), []
    for t in range(N):
        h_t, state = model.step(state, seq[:, t])
        outs.append(h_t)
    stepped = torch.stack(outs, dim=1)
    assert max_rel_err(stepped, model(seq), seq != 0) < 1e-6
    # ... gives the final state of the parallel encoder, too
    _, enc_state = model.encode(seq)
    assert torch.equal(enc_state.num_events, state.num_events)
    for a, b in zip((enc_state.S, enc_state.z), (state.S, state.z)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("attention", STREAMABLE)
def test_step_equals_parallel_default_size_float32(attention):
    """The default config (hidden 64, max_len 200) over 3 × max_len events, float32."""
    cfg = ModelConfig(num_items=3706, attention=attention)
    model = make_model(cfg, torch.float32)
    N = 3 * cfg.max_len
    seq = left_padded([N, 250], N, cfg.num_items)
    h = model(seq)
    state, outs = model.init_state(2), []
    for t in range(N):
        h_t, state = model.step(state, seq[:, t])
        outs.append(h_t)
    assert max_rel_err(torch.stack(outs, 1), h, seq != 0) < 1e-4


@pytest.mark.parametrize("attention", STREAMABLE)
def test_positions_none_and_positions_clamped(attention):
    model = make_model(small_config(attention, positions="none", max_len=2))
    seq = left_padded([9, 4], 9, 40)
    assert max_rel_err(stepped_real_items(model, seq), model(seq), seq != 0) < 1e-6
    # learned positions: beyond max_len the position is clamped, so position 7 uses row max_len - 1
    model = make_model(small_config(attention, max_len=2))
    with torch.no_grad():
        model.position_embedding.weight[1] += 1.0
    h2 = model(seq)
    assert max_rel_err(stepped_real_items(model, seq), h2, seq != 0) < 1e-6


@given(
    data=st.data(),
    attention=st.sampled_from(STREAMABLE),
    N=st.integers(1, 20),
    form=st.sampled_from(["auto", "masked", "chunked"]),
)
@settings(max_examples=25, deadline=None)
def test_hypothesis_lengths_and_paddings(data, attention, N, form):
    lengths = data.draw(st.lists(st.integers(0, N), min_size=1, max_size=3))
    cfg = small_config(attention, parallel_form=form, chunk_size=3, max_len=5)
    model = make_model(cfg, seed=N)
    seq = left_padded(lengths, N, cfg.num_items, seed=sum(lengths))
    h = model(seq)
    mask = seq != 0
    if mask.any():
        assert max_rel_err(stepped_real_items(model, seq), h, mask) < 1e-6
    assert torch.count_nonzero(h[~mask]) == 0


@pytest.mark.parametrize("attention", STREAMABLE)
@pytest.mark.parametrize("split", [1, 7, 15])
def test_encode_split_and_resume(attention, split):
    model = make_model(small_config(attention))
    seq = left_padded([20, 12, 3], 20, 40)
    h = model(seq)
    h1, s1 = model.encode(seq[:, :split])
    h2, s2 = model.encode(seq[:, split:], s1)
    mask = seq != 0
    assert max_rel_err(torch.cat([h1, h2], 1), h, mask) < 1e-9
    _, s_all = model.encode(seq)
    assert torch.equal(s2.num_events, s_all.num_events)
    # one more event from either state gives the same answer
    nxt = torch.tensor([5, 6, 7])
    a, _ = model.step(s2, nxt)
    b, _ = model.step(s_all, nxt)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_padding_item_in_step_is_a_no_op():
    for attention in STREAMABLE:
        model = make_model(small_config(attention))
        _, state = model.encode(left_padded([5, 2], 5, 40))
        h, after = model.step(state, torch.tensor([0, 4]))
        assert torch.count_nonzero(h[0]) == 0
        assert after.num_events.tolist() == [5, 3]
        assert after[0].to_bytes() == state[0].to_bytes(), attention


# --- batches of users --------------------------------------------------------------------------


def history_state(model: LinRecModel, length: int, seed: int) -> tuple[UserState, torch.Tensor]:
    items = torch.randint(1, model.config.num_items + 1, (length,), generator=torch.Generator().manual_seed(seed))
    state = model.init_state(1)
    for i in items:
        _, state = model.step(state, i.view(1))
    return state, items


@pytest.mark.parametrize("attention", STREAMABLE)
def test_stacked_users_with_different_histories_equal_each_alone(attention):
    model = make_model(small_config(attention))
    singles = [history_state(model, n, seed=n)[0] for n in (0, 3, 11)]
    batch = UserState.stack(singles)
    assert len(batch) == 3 and batch.num_events.tolist() == [0, 3, 11]
    if attention == "softmax":
        assert batch.k.shape[3] == 11 and batch.kv_mask.sum(1).tolist() == [0, 3, 11]
    news = torch.randint(1, 41, (4, 3), generator=torch.Generator().manual_seed(9))
    alone = [[] for _ in singles]
    for t in range(4):
        h, batch = model.step(batch, news[t])
        for i in range(3):
            h_i, singles[i] = model.step(singles[i], news[t, i : i + 1])
            alone[i].append(h_i[0])
            torch.testing.assert_close(h[i], h_i[0], rtol=1e-10, atol=1e-12)
    # splitting the batch gives back each user's own state
    # (equal up to rounding: a batched matmul may sum in another order than a single one)
    for i in range(3):
        one = batch[i]
        assert one.num_events.tolist() == singles[i].num_events.tolist()
        for a, b in zip((one.S, one.z, one.k, one.v), (singles[i].S, singles[i].z, singles[i].k, singles[i].v)):
            if b is not None:
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert batch[-1].num_events.tolist() == [15]


def test_stack_and_index_errors():
    a = make_model(small_config("linrec"))
    b = make_model(small_config("linrec"), seed=1)
    with pytest.raises(StateMismatchError, match="different models"):
        UserState.stack([a.init_state(1), b.init_state(1)])
    with pytest.raises(ValueError, match="at least one"):
        UserState.stack([])
    with pytest.raises(IndexError):
        a.init_state(2)[2]
    with pytest.raises(ValueError, match="state holds 2 users"):
        a.step(a.init_state(2), torch.tensor([1]))
    with pytest.raises(StateMismatchError, match="model version"):
        a.step(b.init_state(1), torch.tensor([1]))


def test_state_to_device_and_dtype():
    model = make_model(small_config("linrec_seqnorm"))
    state, _ = history_state(model, 4, seed=0)
    f32 = state.to(dtype=torch.float32)
    assert f32.S.dtype == torch.float32 and f32.num_events.dtype == torch.int64
    assert f32.to("cpu").S.device.type == "cpu"
    # the model casts a state to its own dtype when stepping
    h, nxt = model.step(f32, torch.tensor([2]))
    assert nxt.S.dtype == torch.float64


# --- bytes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", STREAMABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bytes_round_trip_continues_exactly(attention, dtype):
    model = make_model(small_config(attention), dtype)
    state, _ = history_state(model, 12, seed=3)
    blob = state.to_bytes()  # stored in the state's own dtype by default
    back = UserState.from_bytes(blob, expect_model=model)
    assert back.dtype == dtype
    assert back.to_bytes() == blob
    assert back.num_events.tolist() == [12]
    for item in (4, 9, 1):
        h_a, state = model.step(state, torch.tensor([item]))
        h_b, back = model.step(back, torch.tensor([item]))
        assert torch.equal(h_a, h_b)
    # without a model: stored dtype, on the CPU
    assert UserState.from_bytes(blob).dtype == dtype
    assert UserState.from_bytes(state.to_bytes(torch.float32)).dtype == torch.float32


@pytest.mark.parametrize("attention", STREAMABLE)
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_bytes_are_smaller_and_close(attention, dtype, bound):
    model = make_model(small_config(attention), torch.float32)
    state, _ = history_state(model, 20, seed=5)
    full, half = state.to_bytes(), state.to_bytes(dtype)
    assert len(half) - HEADER_SIZE == (len(full) - HEADER_SIZE) // 2
    back = model.load_state_bytes(half)
    assert back.dtype == torch.float32
    h_a, _ = model.step(state, torch.tensor([7]))
    h_b, _ = model.step(back, torch.tensor([7]))
    rel = ((h_a - h_b).norm() / h_a.norm()).item()
    assert 0 < rel < bound


def test_default_config_state_size_matches_the_documentation():
    cfg = ModelConfig(num_items=3706, hidden_size=64, num_layers=2, num_heads=2, attention="linrec", max_len=200, dropout=0.2)
    sizes = {}
    for attention in STREAMABLE:
        model = LinRecModel(replace(cfg, attention=attention)).eval()
        _, state = model.encode(torch.randint(1, 3707, (1, 200)))
        sizes[attention] = len(state.to_bytes())
    assert sizes == {"linrec": 16438, "linrec_decay": 16438, "linrec_seqnorm": 16950, "linear": 16950, "softmax": 204854}


def _linrec_blob():
    model = make_model(small_config("linrec"), torch.float32)
    state, _ = history_state(model, 6, seed=1)
    return model, state.to_bytes()


@pytest.mark.parametrize("cut", [0, 3, 4, 20, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, -1])
def test_truncated_bytes_raise(cut):
    model, blob = _linrec_blob()
    with pytest.raises(StateFormatError):
        UserState.from_bytes(blob[:cut])


def test_malformed_bytes_raise_clear_errors():
    model, blob = _linrec_blob()

    def patched(offset: int, fmt: str, value) -> bytes:
        b = bytearray(blob)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    cases = {
        "bad magic": b"XXXX" + blob[4:],
        "unknown user-state format version 2": patched(4, "<H", 2),
        "header size": patched(6, "<H", 60),
        "unknown attention variant code 9": patched(24, "<B", 9),
        "unknown dtype code 0": patched(25, "<B", 0),
        "invalid sizes": patched(26, "<H", 0),
        "cache length": patched(42, "<Q", 3),
        "truncated": patched(28, "<H", 3),  # more heads than the payload holds
        "unexpected bytes": patched(30, "<H", 2),  # smaller head size: payload too long
        "CRC-32": blob[:-1] + bytes([blob[-1] ^ 1]),
    }
    for message, bad in cases.items():
        with pytest.raises(StateFormatError, match=message):
            UserState.from_bytes(bad)
    with pytest.raises(StateFormatError, match="unexpected bytes"):
        UserState.from_bytes(blob + b"\0")


def test_bytes_of_another_model_are_refused():
    model, blob = _linrec_blob()
    other = make_model(small_config("linrec"), torch.float32, seed=7)
    with pytest.raises(StateMismatchError, match="model version"):
        UserState.from_bytes(blob, expect_model=other)
    with pytest.raises(StateMismatchError, match="model version"):
        other.load_state_bytes(blob)
    seqnorm = make_model(small_config("linrec_seqnorm"), torch.float32)
    with pytest.raises(StateMismatchError, match="attention"):
        seqnorm.load_state_bytes(blob)
    wider = make_model(small_config("linrec", hidden_size=32), torch.float32)
    state = UserState.from_bytes(blob)
    with pytest.raises(StateMismatchError):
        state.check_model(replace_version(wider, state.model_version))
    assert model.load_state_bytes(blob).num_events.tolist() == [6]


def replace_version(model: LinRecModel, version: str) -> LinRecModel:
    """A model that claims another version id (to reach the size check)."""
    model._version_memo = (tuple((t.data_ptr(), t._version, t.dtype) for t in model.state_dict().values()), version)
    return model


def test_to_bytes_needs_a_single_user():
    model = make_model(small_config("linrec"))
    with pytest.raises(ValueError, match="one user"):
        model.init_state(2).to_bytes()
    with pytest.raises(ValueError, match="dtype"):
        model.init_state(1).to_bytes(torch.int32)


# --- versions and checkpoints ------------------------------------------------------------------


def test_version_follows_the_weights_not_the_dtype():
    model = make_model(small_config("linrec"), torch.float32)
    v0 = model.version
    assert len(v0) == 32 and v0 == model.version
    assert model.double().version == v0  # float32 -> float64 is exact
    assert make_model(small_config("linrec"), torch.float32, seed=1).version != v0
    state = model.init_state(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(left_padded([4], 4, 40)).sum().backward()
    opt.step()
    assert model.version != v0
    with pytest.raises(StateMismatchError, match="model version"):
        model.eval().step(state, torch.tensor([1]))


@pytest.mark.parametrize("attention", STREAMABLE + ["linrec_bidir"])
def test_save_load_rebuilds_the_model_from_the_file(tmp_path, attention):
    model = make_model(small_config(attention, positions="none" if attention == "linear" else "learned"), torch.float32)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = LinRecModel.load(path)
    assert loaded.config == model.config and loaded.version == model.version
    assert not loaded.training
    seq = left_padded([6, 3], 6, 40)
    assert torch.equal(loaded(seq), model(seq))
    if attention != "linrec_bidir":
        _, state = model.encode(seq)
        blob = state[0].to_bytes()
        assert loaded.load_state_bytes(blob).num_events.tolist() == [6]


def test_load_rejects_tampered_or_foreign_files(tmp_path):
    model = make_model(small_config("linrec"), torch.float32)
    path = tmp_path / "m.pt"
    model.save(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["norm.weight"] += 1e-3
    torch.save(ckpt, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="do not match the stored version"):
        LinRecModel.load(tmp_path / "tampered.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a linrec-stream model checkpoint"):
        LinRecModel.load(tmp_path / "foreign.pt")


def test_float64_model_saves_and_loads_in_float64(tmp_path):
    model = make_model(small_config("linrec_seqnorm"), torch.float64)
    model.save(tmp_path / "m.pt")
    loaded = LinRecModel.load(tmp_path / "m.pt")
    assert loaded.dtype == torch.float64 and loaded.version == model.version


# --- the official, bidirectional variant -------------------------------------------------------


def test_bidir_is_offline_only():
    model = make_model(small_config("linrec_bidir"))
    seq = left_padded([6, 3], 6, 40)
    h = model(seq)
    changed = seq.clone()
    changed[:, -1] = 1 + changed[:, -1] % 40
    assert not torch.allclose(model(changed)[:, -2], h[:, -2])  # sees the future
    with pytest.raises(StreamingUnsupported, match="no one-event form"):
        model.init_state(1)
    with pytest.raises(StreamingUnsupported):
        model.encode(seq)


@pytest.mark.parametrize("attention", ["linrec_decay", "linrec_seqnorm", "linear", "softmax"])
def test_batch_byte_forms_equal_the_per_user_ones(attention: str):
    model = LinRecModel(ModelConfig(num_items=30, hidden_size=16, num_heads=2, num_layers=2,
                                    attention=attention)).eval()
    with torch.inference_mode():
        _, state = model.encode(torch.randint(0, 31, (7, 9)))
    each = [state[i].to_bytes() for i in range(len(state))]
    assert state.to_bytes_each() == each
    one_by_one = UserState.stack([UserState.from_bytes(b) for b in each])
    batch = UserState.from_bytes_many(each)
    for name in ("num_events", "S", "z", "k", "v", "kv_mask"):
        a, b = getattr(one_by_one, name), getattr(batch, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    corrupt = bytearray(each[3])
    corrupt[-1] ^= 0xFF
    with pytest.raises(StateFormatError, match="CRC"):
        UserState.from_bytes_many([*each[:3], bytes(corrupt)])
    other = LinRecModel(ModelConfig(num_items=30, hidden_size=16, num_heads=2, num_layers=2, attention=attention))
    with torch.inference_mode():
        _, foreign = other.encode(torch.randint(0, 31, (1, 4)))
    with pytest.raises(StateMismatchError):
        UserState.from_bytes_many([*each[:2], foreign.to_bytes()])
