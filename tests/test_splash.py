"""attention_impl="splash": Pallas splash attention (interpret mode on CPU) equals einsum.

Shapes are the smallest the kernel's blocks allow: rows pad to its 128-lane blocks, so every
test runs one block per row. Tolerances, relative to the largest logit or gradient: float32
1e-4 (the kernel adds in another order), bfloat16 3e-2.
"""

from __future__ import annotations

import importlib.util
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training import run_with_devices

from transformer_jax.config import PAD_ID, ModelConfig
from transformer_jax.model import Transformer

VOCAB = 64


def _config(**overrides: object) -> ModelConfig:
    base = {
        "vocab_size": VOCAB,
        "d_model": 32,
        "num_heads": 4,
        "d_ff": 64,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "max_len": 64,
        **overrides,
    }
    return ModelConfig.preset("tiny", **base)


def _packed_batch() -> dict[str, np.ndarray]:
    """Two rows, source 24 and target 17 tokens: packed examples, padding, lengths unequal."""
    rng = np.random.default_rng(0)
    src = rng.integers(4, VOCAB, (2, 24)).astype(np.int32)
    tgt = rng.integers(4, VOCAB, (2, 17)).astype(np.int32)
    # Row 0: three packed examples (sources 9 + 8 + 5, targets 6 + 6 + 3), then padding.
    src_seg = np.zeros((2, 24), np.int32)
    tgt_seg = np.zeros((2, 17), np.int32)
    for i, (s0, s1, t0, t1) in enumerate([(0, 9, 0, 6), (9, 17, 6, 12), (17, 22, 12, 15)]):
        src_seg[0, s0:s1], tgt_seg[0, t0:t1] = i + 1, i + 1
    # Row 1: one example with padding on both sides.
    src_seg[1, :20], tgt_seg[1, :11] = 1, 1
    src = np.where(src_seg > 0, src, PAD_ID)
    tgt = np.where(tgt_seg > 0, tgt, PAD_ID)

    def positions(seg: np.ndarray) -> np.ndarray:
        out = np.zeros_like(seg)
        for r in range(seg.shape[0]):
            for s in set(seg[r]) - {0}:
                idx = np.flatnonzero(seg[r] == s)
                out[r, idx] = np.arange(len(idx))
        return out

    return {
        "src": src,
        "tgt": tgt,
        "src_seg": src_seg,
        "tgt_seg": tgt_seg,
        "src_pos": positions(src_seg),
        "tgt_pos": positions(tgt_seg),
    }


def _loss_and_grads(config: ModelConfig, params: dict, batch: dict) -> tuple[jax.Array, dict, dict]:
    model = Transformer(config)

    def loss(p: dict) -> tuple[jax.Array, jax.Array]:
        logits = model.apply(
            {"params": p},
            batch["src"],
            batch["tgt"],
            batch["src_seg"],
            batch["tgt_seg"],
            batch["src_pos"],
            batch["tgt_pos"],
        )
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        picked = jnp.take_along_axis(logp, batch["tgt"][..., None], axis=-1)[..., 0]
        return -(picked * (batch["tgt"] != PAD_ID)).sum(), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


VARIANTS = {
    "packed_gqa_float32": {"num_kv_heads": 2},
    "mqa_bfloat16": {"num_kv_heads": 1, "dtype": "bfloat16"},
    "scan_remat": {"scan_layers": True, "remat": "full", "norm_position": "pre"},
    # A window on packed, padded rows: splash's LocalMask; padded queries read padded keys.
    "rope_window": {"position_encoding": "rope", "attention_window": 5},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_splash_equals_einsum_for_logits_and_every_gradient(variant: str) -> None:
    config = _config(**VARIANTS[variant])
    batch = _packed_batch()
    model = Transformer(config)
    params = nn.unbox(model.init(jax.random.key(0), batch["src"][:, :4], batch["tgt"][:, :4]))[
        "params"
    ]
    einsum = _loss_and_grads(config, params, batch)
    splash = _loss_and_grads(config.replace(attention_impl="splash"), params, batch)
    tol = 3e-2 if config.dtype == "bfloat16" else 1e-4
    real = batch["tgt"] != PAD_ID  # padded positions' logits are never used
    scale = float(jnp.abs(einsum[1][real]).max())
    np.testing.assert_allclose(splash[1][real], einsum[1][real], atol=tol * scale)
    np.testing.assert_allclose(splash[0], einsum[0], rtol=tol)
    flat_e = jax.tree_util.tree_leaves_with_path(einsum[2])
    flat_s = jax.tree.leaves(splash[2])
    # Against the largest gradient of the model: some are zero in exact arithmetic (the key
    # biases: softmax ignores a shift per query), so theirs is rounding noise in both.
    size = max(float(jnp.abs(e).max()) for _, e in flat_e)
    for (path, e), s in zip(flat_e, flat_s, strict=True):
        assert np.isfinite(np.asarray(s, np.float32)).all(), path
        np.testing.assert_allclose(
            np.asarray(s, np.float32),
            np.asarray(e, np.float32),
            atol=tol * size,
            err_msg=jax.tree_util.keystr(path),
        )


def test_splash_outside_a_mesh_equals_einsum_and_refuses_what_it_cannot_do() -> None:
    """One device, no mesh (a notebook): apply works; bad settings are one line each."""
    config = _config(num_heads=2)
    batch = _packed_batch()
    params = Transformer(config).init(jax.random.key(1), batch["src"], batch["tgt"])
    expected = Transformer(config).apply(params, batch["src"], batch["tgt"])
    got = Transformer(config.replace(attention_impl="splash")).apply(
        params, batch["src"], batch["tgt"]
    )
    real = batch["tgt"] != PAD_ID
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4 * float(abs(expected).max()))
    with pytest.raises(ValueError, match=r"ModelConfig\.attention_dropout_rate: splash"):
        config.replace(attention_impl="splash", attention_dropout_rate=0.1)
    for block in (200, 384):  # the halving that fits short rows needs 128 x a power of two
        with pytest.raises(ValueError, match=rf"ModelConfig\.splash_block_size: {block} must"):
            config.replace(attention_impl="splash", splash_block_size=block)


def test_splash_blocks_pad_any_row_length() -> None:
    from transformer_jax.model import splash

    # Rows shorter than a block pad to the 128 lanes; longer ones to whole blocks.
    assert [splash._padded(n, 512) for n in (1, 128, 129, 512, 513, 4000)] == [
        128,
        128,
        256,
        512,
        1024,
        4096,
    ]
    assert [splash._block(n, 512) for n in (128, 256, 384, 1024)] == [128, 256, 128, 512]


MESH_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from transformer_jax.config import ModelConfig
    from transformer_jax.model import Transformer
    from transformer_jax import sharding
    from transformer_jax.state import init_state
    from transformer_jax.training import step

    assert jax.device_count() == 4, jax.devices()
    cfg = ModelConfig.preset("tiny", vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                             d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                             dropout_rate=0.0)
    rng = np.random.default_rng(0)
    inputs = rng.integers(4, 64, (4, 24)).astype(np.int32)
    targets = rng.integers(4, 64, (4, 17)).astype(np.int32)
    inputs[1, 19:] = 0
    targets[1, 11:] = 0
    batch = {"inputs": inputs, "targets": targets}
    opt = optax.sgd(0.5)
    rules = sharding.DEFAULT_RULES
    results = {}
    for name, impl, shape, devices in (
        ("single_einsum", "einsum", {"data": 1}, jax.devices()[:1]),
        ("data2_tensor2_splash", "splash", {"data": 2, "tensor": 2}, None),
    ):
        model = Transformer(cfg.replace(attention_impl=impl))
        mesh = sharding.make_mesh(shape, devices)
        init_fn = lambda: init_state(model, opt, jax.random.key(0), (1, 8), (1, 8))
        with sharding.context(mesh, rules):
            state, shardings = sharding.sharded_init(init_fn, mesh, rules)
            data = sharding.batch_sharding(mesh)
            f = jax.jit(step.make_train_step(model, opt, lambda s: 0.5, label_smoothing=0.1),
                        in_shardings=(shardings, data, sharding.replicated(mesh)),
                        out_shardings=(shardings, sharding.replicated(mesh)))
            g = {k: jax.make_array_from_process_local_data(data, v) for k, v in batch.items()}
            state, metrics = f(state, g, jax.random.key(1))
            if impl == "splash":
                text = f.lower(state, g, jax.random.key(1)).as_text()
                assert "shard_map" in text or "manual" in text.lower(), "no shard_map"
        results[name] = (jax.device_get(state.params), float(metrics["loss_sum"]))
    (p0, l0), (p1, l1) = results.values()
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    print("SPLASH-MESH-OK", l0, l1)

    # Key heads the tensor axis does not split (parameters replicated, as a notebook would
    # hold them): one key head stays whole on every device; two on a 4-way axis are repeated.
    for kv, shape in ((1, {"data": 2, "tensor": 2}), (2, {"data": 1, "tensor": 4})):
        mqa = cfg.replace(num_kv_heads=kv)
        params = Transformer(mqa).init(jax.random.key(0), inputs[:, :4], targets[:, :4])
        expected = Transformer(mqa).apply(params, inputs, targets)
        with sharding.context(sharding.make_mesh(shape), rules):
            got = jax.jit(Transformer(mqa.replace(attention_impl="splash")).apply)(
                params, inputs, targets)
        real = targets != 0
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=1e-4)
        print("SPLASH-KV-OK", kv)

    # Three heads cannot split over a 2-way tensor axis: refused, naming the field.
    bad = Transformer(cfg.replace(attention_impl="splash", num_heads=3, num_kv_heads=None,
                                  d_model=48))
    mesh = sharding.make_mesh({"data": 2, "tensor": 2})
    params = bad.init(jax.random.key(0), inputs[:, :4], targets[:, :4])
    try:
        with sharding.context(mesh, rules):
            jax.jit(bad.apply)(params, inputs, targets)
    except ValueError as e:
        message = str(e)
        assert "model.num_heads=3 is not divisible" in message and "\\n" not in message, message
        print("SPLASH-HEADS-REFUSED")
    """
)


def test_sharded_splash_step_equals_the_single_device_einsum_step() -> None:
    """A 2 x 2 (data, tensor) mesh of fake CPU devices: splash inside shard_map, one SGD step."""
    out = run_with_devices(MESH_SCRIPT, devices=4)
    for line in ("SPLASH-MESH-OK", "SPLASH-KV-OK 1", "SPLASH-KV-OK 2", "SPLASH-HEADS-REFUSED"):
        assert line in out, out[-3000:]


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu (pip install -e ".[dev]")'
)
def test_splash_train_step_compiles_for_v5e_8() -> None:
    """The Mosaic kernel itself (not interpret mode), under shard_map, for a TPU slice."""
    from configs import default
    from transformer_jax import aot

    config = default.get_config()
    config.model.attention_impl = "splash"
    report = aot.run(config, "v5e-8")
    assert report.fits and report.peak_gib < report.capacity_gib
    assert report.flops_per_chip > 0
