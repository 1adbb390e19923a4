"""Properties of the Transformer: counts, causality, padding/packing invariance, cache, impls."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import step_by_step

from transformer_jax import sharding
from transformer_jax.config import BOS_ID, PAD_ID, ModelConfig
from transformer_jax.model import (
    Transformer,
    init_cache,
    reorder_cache,
    shift_right,
    stack_layer_params,
    unstack_layer_params,
)
from transformer_jax.model.kernels import einsum_attention, fused_attention
from transformer_jax.model.layers import sinusoidal_encoding

SMALL = ModelConfig.preset(
    "tiny",
    vocab_size=61,
    d_model=32,
    num_heads=4,
    d_ff=64,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
    max_len=64,
)

VARIANTS = {
    "paper": {},
    "pre_rms": {"norm_position": "pre", "norm_type": "rmsnorm"},
    "learned_swiglu": {"position_encoding": "learned", "feed_forward": "swiglu"},
    "gqa_untied": {"num_kv_heads": 2, "embedding_sharing": "none"},
    "mqa_target_tied": {"num_kv_heads": 1, "embedding_sharing": "target", "feed_forward": "gelu"},
    "scan_remat": {"scan_layers": True, "remat": "dots"},
    # Positions inside attention and sliding windows (docs/model.md, "Positions and windows").
    "rope_gqa": {"position_encoding": "rope", "num_kv_heads": 2},
    "alibi_window": {"position_encoding": "alibi", "attention_window": 3},
    "none_window_scan": {"position_encoding": "none", "attention_window": 4, "scan_layers": True},
    # Mixture of experts (docs/model.md): every encoder layer, the second decoder layer, top-2.
    # An evaluation capacity of E / k slots per token drops nothing, so rows may be padded,
    # packed or decoded a token at a time without changing which expert serves what.
    "moe_top2": {"moe_num_experts": 4, "moe_encoder_every": 1, "moe_eval_capacity_factor": 2.0},
}


def random_ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int = 61) -> np.ndarray:
    """Non-special token ids."""
    return rng.integers(4, vocab, size=shape).astype(np.int32)


def build(config: ModelConfig, src: np.ndarray, tgt: np.ndarray) -> tuple[Transformer, dict]:
    """A model and its float32 params."""
    model = Transformer(config)
    params = model.init(jax.random.key(0), jnp.asarray(src), jnp.asarray(tgt))["params"]
    return model, nn.unbox(params)


def count(params: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        # 6 * 3,152,384 + 6 * 4,204,032 + 37000 * 512 (docs/model.md)
        ("base", 63_082_496),
        # 6 * 12,596,224 + 6 * 16,796,672 + 37000 * 1024
        ("big", 214_245_376),
    ],
)
def test_full_size_parameter_counts_match_paper_arithmetic(preset: str, expected: int) -> None:
    config = ModelConfig.preset(preset)
    d, f, v, n = config.d_model, config.d_ff, config.vocab_size, config.num_encoder_layers
    attention, ffn, norm = 4 * (d * d + d), 2 * d * f + f + d, 2 * d
    assert n * (attention + ffn + 2 * norm) + n * (2 * attention + ffn + 3 * norm) + v * d == (
        expected
    )
    start = time.perf_counter()
    shapes = jax.eval_shape(
        lambda: Transformer(config).init(
            jax.random.key(0), jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32)
        )
    )
    assert time.perf_counter() - start < 30
    assert count(nn.unbox(shapes["params"])) == expected


def test_every_parameter_has_logical_axis_names() -> None:
    config = ModelConfig.preset(
        "base", norm_position="pre", position_encoding="learned", moe_num_experts=4
    )
    shapes = jax.eval_shape(
        lambda: Transformer(config).init(
            jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
        )
    )
    leaves = jax.tree.leaves(
        shapes["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    names = {n for x in leaves for n in x.names if n is not None}
    assert {"vocab", "embed", "mlp", "heads", "kv", "exp"} <= names
    assert not names & set(sharding.MESH_AXES)
    # Config rules may only name these (rules_from_config refuses others), so all must be there.
    assert names <= sharding.LOGICAL_AXES


def test_rules_from_config_refuses_unknown_names() -> None:
    assert sharding.rules_from_config(None) == sharding.DEFAULT_RULES
    assert sharding.rules_from_config([["embed", ["data", "fsdp"]], ["vocab", None]]) == (
        ("embed", ("data", "fsdp")),
        ("vocab", None),
    )
    with pytest.raises(ValueError, match=r"unknown logical axis 'embd'.*'embed'"):
        sharding.rules_from_config([["embd", "fsdp"]])
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.rules_from_config([["mlp", "model"]])
    with pytest.raises(ValueError, match="each rule is"):
        sharding.rules_from_config([["mlp"]])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decoder_is_causal(variant: str) -> None:
    config = SMALL.replace(**VARIANTS[variant])
    rng = np.random.default_rng(1)
    src, tgt = random_ids(rng, (2, 7)), random_ids(rng, (2, 9))
    model, params = build(config, src, tgt)
    logits = model.apply({"params": params}, src, tgt)
    t = 4
    changed = tgt.copy()
    changed[:, t:] = random_ids(rng, changed[:, t:].shape)
    logits_changed = model.apply({"params": params}, src, changed)
    # Position t predicts target t from targets < t, so positions <= t must not move.
    np.testing.assert_allclose(logits[:, : t + 1], logits_changed[:, : t + 1], atol=1e-5)
    assert not np.allclose(logits[:, t + 1 :], logits_changed[:, t + 1 :], atol=1e-3)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_appending_padding_changes_nothing(variant: str) -> None:
    config = SMALL.replace(**VARIANTS[variant])
    rng = np.random.default_rng(2)
    src, tgt = random_ids(rng, (2, 6)), random_ids(rng, (2, 5))
    model, params = build(config, src, tgt)
    logits = model.apply({"params": params}, src, tgt)
    src_padded = np.pad(src, ((0, 0), (0, 5)), constant_values=PAD_ID)
    tgt_padded = np.pad(tgt, ((0, 0), (0, 3)), constant_values=PAD_ID)
    logits_padded = model.apply({"params": params}, src_padded, tgt_padded)
    np.testing.assert_allclose(logits, logits_padded[:, :5], atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    ["paper", "pre_rms", "gqa_untied", "rope_gqa", "alibi_window", "none_window_scan", "moe_top2"],
)
def test_packed_row_equals_each_sequence_alone(variant: str) -> None:
    config = SMALL.replace(**VARIANTS[variant])
    rng = np.random.default_rng(3)
    src_a, tgt_a = random_ids(rng, (1, 5)), random_ids(rng, (1, 4))
    src_b, tgt_b = random_ids(rng, (1, 3)), random_ids(rng, (1, 6))
    model, params = build(config, src_a, tgt_a)
    alone_a = model.apply({"params": params}, src_a, tgt_a)
    alone_b = model.apply({"params": params}, src_b, tgt_b)

    pad_s, pad_t = 2, 3
    src = np.concatenate([src_a, src_b, np.zeros((1, pad_s), np.int32)], axis=1)
    tgt = np.concatenate([tgt_a, tgt_b, np.zeros((1, pad_t), np.int32)], axis=1)
    src_seg = np.array([[1] * 5 + [2] * 3 + [0] * pad_s], np.int32)
    tgt_seg = np.array([[1] * 4 + [2] * 6 + [0] * pad_t], np.int32)
    src_pos = np.array([[*range(5), *range(3)] + [0] * pad_s], np.int32)
    tgt_pos = np.array([[*range(4), *range(6)] + [0] * pad_t], np.int32)
    packed = model.apply({"params": params}, src, tgt, src_seg, tgt_seg, src_pos, tgt_pos)
    np.testing.assert_allclose(packed[:, :4], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:10], alone_b, atol=1e-5)


def test_shift_right_restarts_at_every_segment() -> None:
    targets = jnp.array([[10, 11, 12, 20, 21, 0, 0]])
    positions = jnp.array([[0, 1, 2, 0, 1, 0, 0]])
    shifted = shift_right(targets, positions)
    assert shifted.tolist() == [[BOS_ID, 10, 11, BOS_ID, 20, BOS_ID, BOS_ID]]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_step_by_step_decoding_equals_full_forward(variant: str) -> None:
    config = SMALL.replace(**VARIANTS[variant])
    rng = np.random.default_rng(4)
    src = random_ids(rng, (3, 6))
    src[1, 4:] = PAD_ID  # a padded source row must still match
    tgt = random_ids(rng, (3, 7))
    model, params = build(config, src, tgt)
    full = model.apply({"params": params}, src, tgt)

    steps = step_by_step(model, params, src, tgt, capacity=tgt.shape[1])
    for t in range(tgt.shape[1]):
        np.testing.assert_allclose(steps[:, t], full[:, t], atol=1e-4, err_msg=f"step {t}")


def test_a_beam_reorder_moves_histories_not_keys() -> None:
    rng = np.random.default_rng(6)
    src = random_ids(rng, (2, 6))
    src[1, 4:] = PAD_ID
    prefixes = random_ids(rng, (4, 3))  # two rows (hypotheses) per source
    model, params = build(SMALL, src, src)
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    cache = init_cache(model, params, encoded, src, max_length=5, copies=2)
    layer = cache["decoder"]["layer_0"]
    assert layer["cross_attention"]["cross_key"].shape[0] == 2  # one memory per source
    assert layer["self_attention"]["cached_key"].shape == (2, SMALL.kv_heads, 2 * 5, SMALL.head_dim)

    def step(cache: dict, previous: np.ndarray) -> tuple[jax.Array, dict]:
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            encoded,
            src,
            previous[:, None],
            decode=True,
            mutable=["cache"],
            method=Transformer.decode,
        )
        return logits[:, 0], mutated["cache"]

    previous = np.full((4,), BOS_ID, np.int32)
    for t in range(3):
        _, cache = step(cache, previous)
        previous = prefixes[:, t]
    # Row 0 continues row 1's history, row 1 keeps its own; source 1's rows both take row 2's.
    rows = np.array([1, 1, 2, 2])
    moved = reorder_cache(cache, jnp.asarray(rows))
    for path in (("self_attention", "cached_key"), ("self_attention", "cached_value")):
        np.testing.assert_array_equal(
            moved["decoder"]["layer_1"][path[0]][path[1]],
            cache["decoder"]["layer_1"][path[0]][path[1]],
        )
    logits, _ = step(moved, prefixes[rows, 2])
    # Teacher-forced: each row's new history is the prefix of the row it took over.
    targets = np.concatenate([prefixes[rows], random_ids(rng, (4, 1))], axis=1)
    full = model.apply({"params": params}, np.repeat(src, 2, axis=0), targets)
    np.testing.assert_allclose(logits, full[:, 3], atol=1e-4)


def test_rows_that_do_not_match_the_sources_or_the_cache_are_refused() -> None:
    rng = np.random.default_rng(7)
    src = random_ids(rng, (2, 5))
    model, params = build(SMALL, src, src)
    with pytest.raises(ValueError, match="4 target rows for 2 sources"):
        model.apply({"params": params}, src, random_ids(rng, (4, 3)))
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    cache = init_cache(model, params, encoded, src, max_length=4)  # one row per source
    with pytest.raises(ValueError, match=r"4 rows step a cache made for 2.*copies="):
        model.apply(
            {"params": params, "cache": cache},
            encoded,
            src,
            random_ids(rng, (4, 1)),
            decode=True,
            mutable=["cache"],
            method=Transformer.decode,
        )


def test_cross_attention_keys_are_projected_once() -> None:
    rng = np.random.default_rng(5)
    src, tgt = random_ids(rng, (2, 6)), random_ids(rng, (2, 4))
    model, params = build(SMALL, src, tgt)
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    cache = init_cache(model, params, encoded, src, max_length=4)
    cross = cache["decoder"]["layer_0"]["cross_attention"]
    assert cross["cross_key"].shape == (2, 6, SMALL.num_heads, SMALL.head_dim)
    # A step given a different encoder output must still read the cached projection.
    _, mutated = model.apply(
        {"params": params, "cache": cache},
        jnp.zeros_like(encoded),
        src,
        np.full((2, 1), BOS_ID, np.int32),
        decode=True,
        mutable=["cache"],
        method=Transformer.decode,
    )
    np.testing.assert_array_equal(
        mutated["cache"]["decoder"]["layer_0"]["cross_attention"]["cross_key"], cross["cross_key"]
    )


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_implementations_agree(kv_heads: int) -> None:
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 7, kv_heads, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 7, kv_heads, 8)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 1, 5, 7)) > 0.3).at[..., 0].set(True)
    ours, _ = einsum_attention(q, k, v, mask)
    fused = fused_attention(q, k, v, mask)
    np.testing.assert_allclose(ours, fused, atol=1e-5)


def test_einsum_attention_matches_the_formula() -> None:
    rng = np.random.default_rng(7)
    q, k, v = (
        rng.normal(size=(1, 3, 1, 4)),
        rng.normal(size=(1, 5, 1, 4)),
        rng.normal(size=(1, 5, 1, 4)),
    )
    out, probs = einsum_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None)
    scores = q[0, :, 0] @ k[0, :, 0].T / np.sqrt(4)  # divided by sqrt(d_k) before softmax
    expected_probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[0, 0], expected_probs, rtol=1e-5)
    np.testing.assert_allclose(out[0, :, 0], expected_probs @ v[0, :, 0], rtol=1e-5, atol=1e-6)


def test_whole_model_agrees_across_attention_implementations() -> None:
    rng = np.random.default_rng(8)
    src, tgt = random_ids(rng, (2, 6)), random_ids(rng, (2, 5))
    src[0, 4:] = PAD_ID
    model, params = build(SMALL, src, tgt)
    fused = Transformer(SMALL.replace(attention_impl="dot_product"))
    np.testing.assert_allclose(
        model.apply({"params": params}, src, tgt),
        fused.apply({"params": params}, src, tgt),
        atol=1e-4,
    )


def test_sinusoidal_encoding_is_the_papers_formula() -> None:
    positions = jnp.array([[0, 1, 5, 37]])
    pe = np.asarray(sinusoidal_encoding(positions, 16))
    for j, pos in enumerate([0, 1, 5, 37]):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            np.testing.assert_allclose(pe[0, j, 2 * i], np.sin(angle), atol=1e-5)
            np.testing.assert_allclose(pe[0, j, 2 * i + 1], np.cos(angle), atol=1e-5)


def test_mixed_precision_keeps_params_and_logits_float32() -> None:
    config = SMALL.replace(dtype="bfloat16")
    rng = np.random.default_rng(9)
    src, tgt = random_ids(rng, (2, 6)), random_ids(rng, (2, 5))
    model, params = build(config, src, tgt)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    logits = model.apply({"params": params}, src, tgt)
    assert logits.dtype == jnp.float32
    reference = Transformer(SMALL).apply({"params": params}, src, tgt)
    np.testing.assert_allclose(logits, reference, atol=0.1)


def test_dropout_is_active_only_when_not_deterministic() -> None:
    config = SMALL.replace(dropout_rate=0.3, attention_dropout_rate=0.1, relu_dropout_rate=0.1)
    rng = np.random.default_rng(10)
    src, tgt = random_ids(rng, (2, 6)), random_ids(rng, (2, 5))
    model, params = build(config, src, tgt)
    a = model.apply({"params": params}, src, tgt)
    b = model.apply({"params": params}, src, tgt)
    np.testing.assert_array_equal(a, b)
    c = model.apply(
        {"params": params}, src, tgt, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(a, c, atol=1e-3)


def test_attention_weights_can_be_captured_for_plots() -> None:
    rng = np.random.default_rng(11)
    src, tgt = random_ids(rng, (1, 6)), random_ids(rng, (1, 4))
    model, params = build(SMALL, src, tgt)
    _, state = model.apply({"params": params}, src, tgt, mutable=["intermediates"])
    weights = state["intermediates"]["decoder"]["layer_1"]["cross_attention"]["attention_weights"]
    (probs,) = weights
    assert probs.shape == (1, SMALL.num_heads, 4, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_scanned_layers_compute_the_same_function() -> None:
    rng = np.random.default_rng(12)
    src, tgt = random_ids(rng, (2, 6)), random_ids(rng, (2, 5))
    src[1, 4:] = PAD_ID
    model, params = build(SMALL, src, tgt)
    scanned = Transformer(SMALL.replace(scan_layers=True))
    stacked = stack_layer_params(params)
    assert jax.tree.structure(stacked) == jax.tree.structure(
        nn.unbox(scanned.init(jax.random.key(0), src, tgt)["params"])
    )
    np.testing.assert_allclose(
        model.apply({"params": params}, src, tgt),
        scanned.apply({"params": stacked}, src, tgt),
        atol=1e-5,
    )
    back = unstack_layer_params(stacked)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat: str, dropout: float) -> None:
    rng = np.random.default_rng(13)
    src, tgt = random_ids(rng, (2, 6)), random_ids(rng, (2, 5))
    config = SMALL.replace(dropout_rate=dropout)
    model, params = build(config, src, tgt)
    rematted = Transformer(config.replace(remat=remat))
    # With dropout on, the recomputed forward pass must draw the same masks.
    kwargs = {"deterministic": False, "rngs": {"dropout": jax.random.key(7)}} if dropout else {}

    def loss(m: Transformer):
        return lambda p: jnp.sum(
            jax.nn.log_softmax(m.apply({"params": p}, src, tgt, **kwargs))[..., 5]
        )

    plain = jax.jit(jax.grad(loss(model)))(params)
    again = jax.jit(jax.grad(loss(rematted)))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(again), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    if dropout:  # the masks were really drawn: the gradients differ from dropout off
        off = jax.jit(jax.grad(loss(Transformer(SMALL))))(params)
        assert not all(
            np.allclose(a, b, atol=1e-5)
            for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(plain), strict=True)
        )
