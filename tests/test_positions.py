"""Positions inside attention (RoPE, ALiBi, none) and sliding windows, with the ring cache.

The equivalences every switch must keep (causality, padding, packing, cached = full forward)
run over these schemes in tests/test_model.py's VARIANTS; this file holds what is particular to
them: the formulas, relative positions, the window's reach, the ring cache, every kernel, the
decoders and a training run that stops and resumes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import checkpoint_params, step_by_step, tiny_train_config
from test_model import SMALL

from transformer_jax.config import EOS_ID, PAD_ID, ModelConfig
from transformer_jax.inference.decode import beam_search, greedy_decode
from transformer_jax.interop import ctranslate2 as ct2_format
from transformer_jax.interop import huggingface
from transformer_jax.model import Transformer
from transformer_jax.model.positions import alibi_slopes, rope


def _ids(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(4, 61, size=shape).astype(np.int32)


def _build(config: ModelConfig, src: np.ndarray, tgt: np.ndarray) -> tuple[Transformer, dict]:
    model = Transformer(config)
    return model, nn.unbox(model.init(jax.random.key(0), src, tgt)["params"])


def test_rope_is_the_rotate_half_rotation_in_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 50, size=(2, 5))
    half = 4
    freq = 10000.0 ** (-np.arange(half) * 2.0 / 8)
    angle = positions[:, :, None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    expected = np.concatenate(
        [x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1
    )
    np.testing.assert_allclose(
        rope(jnp.asarray(x), jnp.asarray(positions), 10000.0), expected, atol=1e-5
    )
    # A rotation: norms kept, and q . k depends on the positions' difference only.
    q, k = jnp.asarray(x[:, :1]), jnp.asarray(x[:, 1:2])
    dots = [
        float((rope(q, jnp.full((2, 1), p + 3), 1e4) * rope(k, jnp.full((2, 1), p), 1e4)).sum())
        for p in (0, 11, 40)
    ]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def test_alibi_slopes_are_the_papers() -> None:
    # Press et al.'s get_slopes: 2^(-8/n), 2^(-16/n), ...; non powers of two take the slopes of
    # the power of two below, then every other slope of twice that many.
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-k for k in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    np.testing.assert_allclose(
        alibi_slopes(12), [*(2.0**-k for k in range(1, 9)), 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    )


@pytest.mark.parametrize(
    ("scheme", "relative"),
    [("rope", True), ("alibi", True), ("sinusoidal", False), ("none", True)],
)
def test_relative_schemes_ignore_a_shift_of_every_position(scheme: str, relative: bool) -> None:
    config = SMALL.replace(position_encoding=scheme)
    rng = np.random.default_rng(1)
    src = _ids(rng, (2, 9))
    model, params = _build(config, src, src)
    positions = np.broadcast_to(np.arange(9, dtype=np.int32), src.shape)
    segments = np.ones_like(src)

    def encode(shift: int) -> np.ndarray:
        return np.asarray(
            model.apply(
                {"params": params}, src, segments, positions + shift, method=Transformer.encode
            )
        )

    same = np.allclose(encode(0), encode(17), atol=1e-4)
    assert same == relative, scheme


def test_a_window_reaches_n_times_w_minus_1_back_and_no_further() -> None:
    window, layers = 3, 2
    config = SMALL.replace(attention_window=window, position_encoding="rope")
    reach = layers * (window - 1)  # 4: the output at t reads inputs t - 4 .. t
    rng = np.random.default_rng(2)
    src, tgt = _ids(rng, (1, 12)), _ids(rng, (1, 12))
    model, params = _build(config, src, tgt)
    t = 10
    base_enc = model.apply({"params": params}, src, method=Transformer.encode)[0, t]
    base_dec = model.apply({"params": params}, src, tgt)[0, t]
    for offset in range(1, 8):
        # Encoder, both sides: position t reads t - reach .. t + reach.
        for j in (t - offset, t + offset):
            if 0 <= j < 12:
                moved = src.copy()
                moved[0, j] = 4 + (src[0, j] - 3) % 57
                out = model.apply({"params": params}, moved, method=Transformer.encode)[0, t]
                assert (not np.allclose(out, base_enc, atol=1e-5)) == (offset <= reach), j
        # Decoder: logits at t read decoder inputs t - reach .. t, the targets one earlier.
        j = t - offset  # the decoder input at j is target j - 1
        moved = tgt.copy()
        moved[0, j - 1] = 4 + (tgt[0, j - 1] - 3) % 57
        out = model.apply({"params": params}, src, moved)[0, t]
        assert (not np.allclose(out, base_dec, atol=1e-5)) == (t - j <= reach), j


@pytest.mark.parametrize("scheme", ["rope", "alibi"])
def test_the_ring_cache_keeps_w_slots_over_4w_steps_and_equals_the_windowed_forward(
    scheme: str,
) -> None:
    window = 4
    config = SMALL.replace(attention_window=window, position_encoding=scheme)
    rng = np.random.default_rng(3)
    src, tgt = _ids(rng, (2, 6)), _ids(rng, (2, 4 * window))
    src[1, 4:] = PAD_ID
    model, params = _build(config, src, tgt)
    full = model.apply({"params": params}, src, tgt)

    def keeps_w_slots(t: int, cache: dict) -> None:
        keys = cache["decoder"]["layer_0"]["self_attention"]["cached_key"]
        assert keys.shape == (2, config.kv_heads, window, config.head_dim), t

    steps = step_by_step(model, params, src, tgt, capacity=window, on_step=keeps_w_slots)
    for t in range(tgt.shape[1]):
        np.testing.assert_allclose(steps[:, t], full[:, t], atol=1e-4, err_msg=f"step {t}")


@pytest.mark.parametrize(
    "overrides",
    [
        {"position_encoding": "rope"},
        {"position_encoding": "alibi"},
        {"position_encoding": "none"},
        {"position_encoding": "rope", "attention_window": 3},
        {"attention_window": 5},
    ],
    ids=["rope", "alibi", "none", "rope_window", "sinusoidal_window"],
)
def test_every_kernel_gives_the_same_logits(overrides: dict) -> None:
    config = SMALL.replace(num_encoder_layers=1, num_decoder_layers=1, **overrides)
    rng = np.random.default_rng(4)
    src, tgt = _ids(rng, (2, 9)), _ids(rng, (2, 7))
    src[0, 6:], tgt[0, 5:] = PAD_ID, PAD_ID
    _, params = _build(config, src, tgt)
    impls = ["einsum", "dot_product"]
    if config.position_encoding != "alibi":
        impls.append("splash")
    else:
        with pytest.raises(ValueError, match=r"ModelConfig\.position_encoding: 'alibi'.*splash"):
            config.replace(attention_impl="splash")
    real = tgt != PAD_ID
    logits = {
        impl: np.asarray(
            Transformer(config.replace(attention_impl=impl)).apply({"params": params}, src, tgt)
        )[real]
        for impl in impls
    }
    for impl in impls[1:]:
        np.testing.assert_allclose(logits[impl], logits["einsum"], atol=1e-4, err_msg=impl)


@pytest.mark.parametrize(
    "overrides",
    [
        {"position_encoding": "rope", "attention_window": 3},
        {"position_encoding": "alibi"},
        {"position_encoding": "none", "attention_window": 2},
    ],
    ids=["rope_window", "alibi", "none_window"],
)
def test_greedy_and_beam_decode_every_scheme(overrides: dict) -> None:
    config = SMALL.replace(**overrides)
    rng = np.random.default_rng(5)
    src = _ids(rng, (3, 6))
    src[2, 3:] = PAD_ID
    model, params = _build(config, src, src)
    # 24 steps: many times around the window's ring.
    options = {"max_length": 24, "extra_length": 100}
    greedy = np.asarray(greedy_decode(model, params, jnp.asarray(src), **options))
    tokens, scores = beam_search(model, params, jnp.asarray(src), beam_size=4, **options)
    assert greedy.shape == (3, 24) and np.asarray(tokens).shape[0] == 3
    assert np.isfinite(np.asarray(scores)).all()


def test_the_exports_refuse_what_they_cannot_carry() -> None:
    for config, field in (
        (SMALL.replace(position_encoding="rope"), "position_encoding"),
        (SMALL.replace(position_encoding="alibi"), "position_encoding"),
        (SMALL.replace(attention_window=8), "attention_window"),
    ):
        for unsupported in (ct2_format.unsupported, huggingface.unsupported):
            assert [p for p in unsupported(config) if p.startswith(f"{field}=")], (
                unsupported.__module__,
                config,
            )
    # CTranslate2 carries "none" exactly: a table of zero positions.
    assert ct2_format.unsupported(SMALL.replace(position_encoding="none")) == []
    assert huggingface.unsupported(SMALL.replace(position_encoding="none")) != []


def test_a_run_stops_and_resumes_exactly(small_corpus, tmp_path) -> None:
    """Through train_and_evaluate with rope, a window and a mixture of experts in the encoder
    (one run for CI time: the other schemes hold no state a resume could lose, every scheme's
    parameters are ordinary checkpointed leaves, and the experts' routing is a function of them)."""
    from transformer_jax.training.loop import train_and_evaluate

    config = tiny_train_config(small_corpus)
    config.model.position_encoding = "rope"
    config.model.attention_window = 8
    config.model.moe_num_experts = 4
    config.model.moe_encoder_every = 1
    config.data.test_split = ""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_and_evaluate(config, straight)
    assert train_and_evaluate(config, resumed, stop_after=2).step == 2
    assert train_and_evaluate(config, resumed).step == config.train.num_steps
    for a, b in zip(checkpoint_params(straight, 6), checkpoint_params(resumed, 6), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_ensemble_of_windows_steps_its_ring_as_the_mean_of_its_members() -> None:
    """Members with windows 3 and 5 share a ring of 5 slots; each still reads only its own."""
    from transformer_jax.model import Ensemble

    configs = (
        SMALL.replace(position_encoding="rope", attention_window=3),
        SMALL.replace(position_encoding="alibi", attention_window=5),
    )
    rng = np.random.default_rng(6)
    src, tgt = _ids(rng, (2, 6)), _ids(rng, (2, 14))
    members = [_build(c, src, tgt) for c in configs]
    ensemble = Ensemble(configs)
    assert ensemble.config.attention_window == 5
    params = {f"members_{i}": p for i, (_, p) in enumerate(members)}
    expected = np.mean(
        [np.asarray(jax.nn.log_softmax(m.apply({"params": p}, src, tgt))) for m, p in members],
        axis=0,
    )
    steps = step_by_step(ensemble, params, src, tgt, capacity=5)
    for t in range(tgt.shape[1]):
        np.testing.assert_allclose(steps[:, t], expected[:, t], atol=1e-4, err_msg=f"step {t}")


def test_decoding_through_the_ring_equals_decoding_through_one_long_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Window 40: the cache grows 16 -> 40 and wraps in 100 steps; the same tokens as a 100-slot
    buffer read through the same window, for greedy and beam 4."""
    from transformer_jax.inference import decode

    config = SMALL.replace(position_encoding="alibi", attention_window=40, max_len=128)
    rng = np.random.default_rng(7)
    src = _ids(rng, (2, 6))
    model, params = _build(config, src, src)
    options = {"max_length": 100, "extra_length": 200}

    def run() -> tuple[np.ndarray, ...]:
        greedy = greedy_decode(model, params, jnp.asarray(src), return_scores=True, **options)
        beam = beam_search(model, params, jnp.asarray(src), beam_size=4, **options)
        return tuple(np.asarray(x) for x in (*greedy, *beam))

    assert decode.cache_capacities(100, 40) == [16, 40]
    ring = run()
    # Some sentence must decode past the window's 40 slots, or nothing wrapped.
    assert (ring[0][:, :50] != EOS_ID).all(axis=1).any(), ring[0]
    monkeypatch.setattr(decode, "cache_capacities", lambda max_length, window: [max_length])
    long = run()
    for a, b in zip(ring, long, strict=True):
        if a.dtype == np.int32:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, atol=1e-4)
