"""Mixture-of-experts feed-forward layers (model/moe.py): routing, capacity, auxiliary losses,
both dispatches, the training step's generic auxiliary-loss path, and the refusals.

The equivalences every switch keeps (padding, packing, causality, cached decoding = the full
forward pass) run over an MoE variant in tests/test_model.py's VARIANTS, with a capacity that
drops nothing; expert parallelism on 8 fake devices is at the end of this file.
"""

from __future__ import annotations

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_train_config
from test_model import SMALL
from test_training import run_with_devices

from transformer_jax import experiment
from transformer_jax.config import BOS_ID, PAD_ID, ModelConfig
from transformer_jax.interop import ctranslate2 as ct2_format
from transformer_jax.interop import huggingface
from transformer_jax.model import Transformer
from transformer_jax.model.layers import AUX_LOSS, COUNTS, reported_sums
from transformer_jax.model.moe import MoEFeedForward, active_parameters, capacity, route
from transformer_jax.training import metrics, optim, step

EXPERTS = 4


def _layer(
    rng: np.random.Generator, batch: int, length: int, **overrides: object
) -> tuple[MoEFeedForward, dict, np.ndarray]:
    config = SMALL.replace(moe_num_experts=EXPERTS, **overrides)
    layer = MoEFeedForward(config)
    x = rng.normal(size=(batch, length, config.d_model)).astype(np.float32)
    params = nn.unbox(layer.init(jax.random.key(1), x, deterministic=True)["params"])
    # Biases start at zero; give them values so the reference checks them too.
    for name in ("wi_bias", "wo_bias", "wi_gate_bias"):
        if name in params:
            params[name] = jnp.asarray(rng.normal(size=params[name].shape), jnp.float32)
    return layer, params, x


def _reference(config: ModelConfig, params: dict, x: np.ndarray, kept: np.ndarray | None):
    """Each token through its chosen experts one by one, weighted by its gates (NumPy, f64)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    k = config.moe_experts_per_token
    out = np.zeros(x.shape, np.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t].astype(np.float64)
            logits = token @ p["router"]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            chosen = np.argsort(-probs, kind="stable")[:k]
            gates = probs[chosen] if k == 1 else probs[chosen] / probs[chosen].sum()
            for rank, (e, gate) in enumerate(zip(chosen, gates, strict=True)):
                if kept is not None and not kept[b, t, rank]:
                    continue
                h = token @ p["wi"][e] + p["wi_bias"][e]
                if config.expert_feed_forward == "swiglu":
                    g = token @ p["wi_gate"][e] + p["wi_gate_bias"][e]
                    h = g / (1 + np.exp(-g)) * h
                else:
                    h = np.maximum(h, 0.0)
                out[b, t] += gate * (h @ p["wo"][e] + p["wo_bias"][e])
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        {"moe_experts_per_token": 1},
        {"moe_experts_per_token": 2},
        {"moe_experts_per_token": 2, "moe_feed_forward": "swiglu", "moe_d_ff": 48},
    ],
    ids=["top1", "top2", "top2_swiglu"],
)
def test_the_layer_equals_a_per_token_loop_without_a_capacity_limit(overrides: dict) -> None:
    rng = np.random.default_rng(0)
    # A capacity factor of E / k gives every expert a slot for every token of the row.
    factor = EXPERTS / overrides["moe_experts_per_token"]
    layer, params, x = _layer(rng, 3, 7, moe_eval_capacity_factor=factor, **overrides)
    y = layer.apply({"params": params}, jnp.asarray(x), deterministic=True)
    expected = _reference(layer.config, params, x, kept=None)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)


def _documented_drops(
    expert_BxLxK: np.ndarray, valid_BxL: np.ndarray, slots: int, causal: bool
) -> np.ndarray:
    """The docstring's rule: first choices in row order, then second choices (encoder), or
    token by token (decoder); a choice whose expert is full is dropped."""
    batch, length, k = expert_BxLxK.shape
    kept = np.zeros(expert_BxLxK.shape, bool)
    order = [(r, t) for t in range(length) for r in range(k)] if causal else None
    order = order or [(r, t) for r in range(k) for t in range(length)]
    for b in range(batch):
        used: dict[int, int] = {}
        for rank, t in order:
            e = int(expert_BxLxK[b, t, rank])
            if valid_BxL[b, t] and used.get(e, 0) < slots:
                kept[b, t, rank] = True
                used[e] = used.get(e, 0) + 1
    return kept


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_a_capacity_limit_drops_exactly_the_documented_choices(causal: bool) -> None:
    rng = np.random.default_rng(1)
    layer, params, x = _layer(rng, 3, 12, moe_experts_per_token=2, moe_eval_capacity_factor=0.5)
    layer = layer.clone(causal=causal)
    valid = np.ones((3, 12), bool)
    valid[1, 9:] = False
    slots = capacity(12, 2, EXPERTS, 0.5)
    assert slots == 3
    # Skew the router so that a few experts overflow.
    params["router"] = params["router"].at[:, 0].add(0.5)
    logits = np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64)
    routes, _, counts = route(
        jnp.asarray(logits, jnp.float32), jnp.asarray(valid), 2, slots, causal
    )
    expected = _documented_drops(np.asarray(routes.expert_BxLxK), valid, slots, causal)
    np.testing.assert_array_equal(np.asarray(routes.kept_BxLxK), expected)
    assert 0 < (~expected & valid[..., None]).sum() == float(counts["dropped"])
    assert float(counts["routed"]) == valid.sum() * 2
    # The layer's output: exactly the kept choices, through the reference loop.
    y = layer.apply({"params": params}, jnp.asarray(x), jnp.asarray(valid), deterministic=True)
    reference = _reference(layer.config, params, x, kept=expected)
    np.testing.assert_allclose(np.asarray(y), reference, rtol=1e-4, atol=1e-4)
    # Padding is never routed: it gets 0 from the layer.
    assert np.abs(np.asarray(y)[1, 9:]).max() == 0.0


def test_the_decoder_stays_causal_while_its_experts_drop_choices() -> None:
    """Slots go token by token in the decoder: later targets cannot change earlier drops."""
    config = SMALL.replace(
        moe_num_experts=EXPERTS,
        moe_encoder_every=0,
        moe_decoder_every=1,
        moe_eval_capacity_factor=0.25,
    )
    rng = np.random.default_rng(6)
    src, tgt = rng.integers(4, 61, (2, 7)), rng.integers(4, 61, (2, 12))
    model = Transformer(config)
    params = nn.unbox(model.init(jax.random.key(0), src, tgt)["params"])
    logits, reported = model.apply({"params": params}, src, tgt, mutable=[COUNTS])
    assert float(reported_sums(reported[COUNTS])["moe_dropped"]) > 0
    t = 5
    changed = tgt.copy()
    changed[:, t:] = rng.integers(4, 61, changed[:, t:].shape)
    logits_changed = model.apply({"params": params}, src, changed)
    np.testing.assert_allclose(logits[:, : t + 1], logits_changed[:, : t + 1], atol=1e-5)
    # The rule is what keeps it so: under GShard's order (every first choice before any
    # second one) new logits for the later tokens change which earlier choices are dropped.
    logits_LxE = rng.normal(size=(1, 12, EXPERTS)).astype(np.float32)
    later = logits_LxE.copy()
    later[:, t:] = rng.normal(size=later[:, t:].shape) * 3
    valid = jnp.ones((1, 12), bool)

    def kept(x: np.ndarray, causal: bool) -> np.ndarray:
        return np.asarray(route(jnp.asarray(x), valid, 2, 3, causal)[0].kept_BxLxK)[:, :t]

    np.testing.assert_array_equal(kept(logits_LxE, True), kept(later, True))
    assert (kept(logits_LxE, False) != kept(later, False)).any()


def test_load_balancing_is_one_when_uniform_and_grows_when_routing_collapses() -> None:
    tokens = 4 * EXPERTS
    valid = jnp.ones((1, tokens), bool)
    # Token i prefers expert i mod E: every expert gets the same share of tokens and of
    # probability mass, f_e = P_e = 1 / E.
    uniform = 5.0 * jax.nn.one_hot(jnp.arange(tokens) % EXPERTS, EXPERTS)[None]
    _, losses, _ = route(uniform, valid, 1, tokens)
    np.testing.assert_allclose(float(losses["load_balance"]), 1.0, rtol=1e-6)
    collapsed = 5.0 * jax.nn.one_hot(jnp.zeros(tokens, int), EXPERTS)[None]
    _, collapsed_losses, _ = route(collapsed, valid, 1, tokens)
    assert float(collapsed_losses["load_balance"]) > 0.9 * EXPERTS
    # z-loss: the mean over real tokens of logsumexp(logits)^2 (padding left out).
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, EXPERTS)).astype(np.float32) * 3
    valid = np.ones((2, 5), bool)
    valid[0, 3:] = False
    _, losses, _ = route(jnp.asarray(logits), jnp.asarray(valid), 2, 5)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(losses["router_z"]), (lse[valid] ** 2).mean(), rtol=1e-5)


def test_einsum_and_ragged_dispatch_agree_in_outputs_and_gradients() -> None:
    rng = np.random.default_rng(3)
    layer, params, x = _layer(
        rng, 2, 9, moe_experts_per_token=2, moe_capacity_factor=2.0, moe_feed_forward="swiglu"
    )
    valid = np.ones((2, 9), bool)
    valid[1, 6:] = False
    ragged = MoEFeedForward(layer.config.replace(moe_dispatch="ragged"))

    def loss(module: MoEFeedForward, p: dict, inputs: jax.Array) -> jax.Array:
        y, reported = module.apply(
            {"params": p},
            inputs,
            jnp.asarray(valid),
            deterministic=False,
            mutable=[AUX_LOSS, COUNTS],
        )
        aux = sum(reported_sums(reported[AUX_LOSS]).values())
        return jnp.sum(jnp.sin(y)) + aux, (y, reported_sums(reported[COUNTS]))

    results = [
        jax.grad(lambda p, i, m=m: loss(m, p, i), argnums=(0, 1), has_aux=True)(
            params, jnp.asarray(x)
        )
        for m in (layer, ragged)
    ]
    (grads_e, (y_e, counts_e)), (grads_r, (y_r, counts_r)) = results
    assert float(counts_e["moe_dropped"]) == 0.0 == float(counts_r["moe_dropped"])
    np.testing.assert_allclose(np.asarray(y_e), np.asarray(y_r), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_e), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_the_train_step_adds_reported_losses_and_carries_them_through_accumulation() -> None:
    config = SMALL.replace(moe_num_experts=EXPERTS, dropout_rate=0.0)
    model = Transformer(config)
    rng = np.random.default_rng(4)
    batch = {
        "inputs": jnp.asarray(rng.integers(4, 61, (4, 6)), jnp.int32),
        "targets": jnp.asarray(rng.integers(4, 61, (4, 5)), jnp.int32),
    }
    batch["targets"] = batch["targets"].at[3, 3:].set(PAD_ID)
    params = nn.unbox(model.init(jax.random.key(0), batch["inputs"], batch["targets"])["params"])
    _, reported = step.forward_reporting(model, params, batch, jax.random.key(0))
    assert set(reported) == {
        "aux_loss/moe_load_balance",
        "aux_loss/moe_router_z",
        "counts/moe_expert_load",
        "counts/moe_routed",
        "counts/moe_dropped",
    }
    # One MoE layer in each stack (every 2nd of 2): the real tokens, twice each (top-2).
    real = 4 * 6 + int((np.asarray(batch["targets"]) != PAD_ID).sum())
    assert float(reported["counts/moe_routed"]) == 2 * real
    assert float(jnp.sum(reported["counts/moe_expert_load"])) == 2 * real

    sgd, schedule = optax_sgd()
    state = _state(params, sgd)
    new_state, m1 = jax.jit(step.make_train_step(model, sgd, schedule, label_smoothing=0.0))(
        state, batch, jax.random.key(0)
    )
    # The gradient includes the auxiliary losses: without them the update differs.
    plain = Transformer(config.replace(moe_load_balance_loss=0.0, moe_router_z_loss=0.0))
    plain_state, _ = jax.jit(step.make_train_step(plain, sgd, schedule, label_smoothing=0.0))(
        _state(params, sgd), batch, jax.random.key(0)
    )
    router = ("encoder", "layer_1", "moe", "router")

    def leaf(s: object) -> np.ndarray:
        value = s.params  # type: ignore[attr-defined]
        for key in router:
            value = value[key]
        return np.asarray(value)

    assert not np.allclose(leaf(new_state), leaf(plain_state))
    accumulating = step.make_train_step(
        model, sgd, schedule, label_smoothing=0.0, grad_accum_steps=2
    )
    _, m2 = jax.jit(accumulating)(_state(params, sgd), batch, jax.random.key(0))
    assert float(m2["counts/moe_routed"]) == float(m1["counts/moe_routed"])
    for name in ("aux_loss/moe_load_balance", "aux_loss/moe_router_z"):
        # The mean of two half-batches' losses: close to the whole batch's, not twice it.
        assert 0.5 < float(m2[name]) / float(m1[name]) < 1.5
    summary = metrics.interval_summary([m1, m2], 1.0, 1.0, 1, None)
    np.testing.assert_allclose(
        summary["aux_loss/moe_router_z"],
        (float(m1["aux_loss/moe_router_z"]) + float(m2["aux_loss/moe_router_z"])) / 2,
        rtol=1e-6,
    )
    assert summary["moe/dropped_fraction"] == pytest.approx(
        float(m1["counts/moe_dropped"] + m2["counts/moe_dropped"])
        / float(m1["counts/moe_routed"] + m2["counts/moe_routed"])
    )
    assert sum(summary[f"moe/load/expert_{e}"] for e in range(EXPERTS)) == pytest.approx(EXPERTS)


def optax_sgd():
    """Plain SGD at the paper's schedule: the update is linear in the gradient."""
    import optax

    _, schedule = optim.make_optimizer(d_model=32, warmup_steps=10)
    return optax.sgd(schedule), schedule


def _state(params: dict, opt) -> object:
    from transformer_jax.state import TrainState

    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))


def test_parameter_and_flop_counts_use_the_active_experts() -> None:
    base = ModelConfig.preset("base")
    moe = base.replace(moe_num_experts=8)
    params = jax.eval_shape(
        lambda: nn.unbox(
            Transformer(moe).init(
                jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
            )["params"]
        )
    )
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    expert = 512 * 2048 * 2 + 2048 + 512  # wi, wo and their biases
    dense = 63_082_496  # the base model (docs/model.md)
    # 3 encoder + 3 decoder MoE layers: each trades one FFN for 8 experts and a router.
    assert total == dense + 6 * (7 * expert + 512 * 8)
    assert active_parameters(moe, params) == dense + 6 * (expert + 512 * 8)
    # FLOPs: the 6 MoE layers add a second expert and the router per token.
    extra = metrics.forward_flops(moe, 1, 10, 10) - metrics.forward_flops(base, 1, 10, 10)
    assert extra == 6 * 10 * (2 * 512 * 2048 * 2 + 2 * 512 * 8)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"moe_num_experts": 4, "moe_experts_per_token": 5}, "moe_experts_per_token"),
        ({"moe_num_experts": 4, "moe_capacity_factor": 0.0}, "moe_capacity_factor"),
        ({"moe_num_experts": 4, "moe_eval_capacity_factor": -1.0}, "moe_eval_capacity_factor"),
        ({"moe_num_experts": 4, "moe_encoder_every": 0, "moe_decoder_every": 0}, "moe_num_experts"),
        ({"moe_num_experts": 4, "scan_layers": True}, "scan_layers"),
        ({"moe_num_experts": 4, "moe_feed_forward": "tanh"}, "moe_feed_forward"),
    ],
)
def test_bad_moe_settings_are_one_line_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^ModelConfig\.{field}: [^\n]*$"):
        SMALL.replace(**overrides)


def test_an_expert_axis_that_does_not_divide_the_experts_is_refused(small_corpus) -> None:
    config = tiny_train_config(small_corpus)
    config.model.moe_num_experts = 4
    config.model.moe_encoder_every = 1
    config.mesh.shape.expert = 3
    with pytest.raises(ValueError, match=r"^config\.mesh\.shape\.expert=3 does not divide [^\n]*"):
        experiment.validate(config)
    config.mesh.shape.expert = -1
    config.mesh.shape.data = 1
    with pytest.raises(ValueError, match=r"mesh\.shape\.expert=8 does not divide"):
        experiment.validate(config, jax.devices()[:1] * 8)
    config.mesh.shape.expert = 2
    experiment.validate(config)


def test_the_exports_refuse_experts_by_field() -> None:
    config = SMALL.replace(moe_num_experts=4)
    for unsupported in (ct2_format.unsupported, huggingface.unsupported):
        assert [p.split("=")[0] for p in unsupported(config)] == ["moe_num_experts"]
        # The knobs alone (experts off) export: they do nothing in a dense model.
        assert unsupported(SMALL.replace(moe_experts_per_token=1, moe_d_ff=7)) == []


EXPERT_MESH_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, optax, flax.linen as nn
    from transformer_jax import sharding
    from transformer_jax.config import ModelConfig
    from transformer_jax.model import Transformer
    from transformer_jax.state import init_state
    from transformer_jax.training import optim, step

    assert jax.device_count() == 8, jax.devices()
    base = ModelConfig.preset("tiny", vocab_size=64, d_model=32, num_heads=4, d_ff=64,
                              dropout_rate=0.0, moe_num_experts=8, moe_capacity_factor=1.0)
    # Every layer MoE so that scanning (one layer body) takes them too; the dense FFN of the
    # unscanned model's alternate layers is covered by the default every-2nd layout.
    models = {"alternate": Transformer(base),
              "scan_remat": Transformer(base.replace(scan_layers=True, remat="full",
                                                     moe_encoder_every=1, moe_decoder_every=1))}
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(4, 64, (8, 8)).astype(np.int32),
             "targets": rng.integers(4, 64, (8, 8)).astype(np.int32)}
    batch["targets"][5, 4:] = 0
    _, schedule = optim.make_optimizer(d_model=32, warmup_steps=10)
    sgd = optax.sgd(schedule)
    rules = sharding.DEFAULT_RULES
    STRATEGIES = {
        "single": ({"data": 1}, jax.devices()[:1]),
        "expert4_data2": ({"data": 2, "expert": 4}, None),
        "expert2_fsdp4": ({"fsdp": 4, "expert": 2}, None),
        "expert2_fsdp2_tensor2": ({"fsdp": 2, "expert": 2, "tensor": 2}, None),
    }
    runs = [("alternate", s) for s in STRATEGIES] + [("scan_remat", "single"),
                                                     ("scan_remat", "expert4_data2")]
    results = {}
    for variant, name in runs:
        model = models[variant]
        shape, devices = STRATEGIES[name]
        mesh = sharding.make_mesh(shape, devices)
        init_fn = lambda: init_state(model, sgd, jax.random.key(0), (1, 8), (1, 8))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state, shardings = sharding.sharded_init(init_fn, mesh, rules)
            data = sharding.batch_sharding(mesh)
            f = jax.jit(step.make_train_step(model, sgd, schedule, label_smoothing=0.1),
                        in_shardings=(shardings, data, sharding.replicated(mesh)),
                        out_shardings=(shardings, sharding.replicated(mesh)),
                        donate_argnums=0)
            losses, dropped = [], []
            for _ in range(2):
                g = {k: jax.make_array_from_process_local_data(data, v) for k, v in batch.items()}
                state, metrics = f(state, g, jax.random.key(1))
                losses.append(float(metrics["loss_sum"]))
                dropped.append(float(metrics["counts/moe_dropped"]))
        # Each device holds only its experts: 8 / expert of them, split further by fsdp on
        # embed and tensor on mlp, and nothing else of the expert weights.
        sizes = dict(mesh.shape)
        flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
        for path, leaf in flat:
            keys = [str(p.key) for p in path]
            if keys[-1] in ("wi", "wo"):
                layers = (leaf.shape[0],) if "layers" in keys else ()
                d, f_ = (32 // sizes["fsdp"], 64 // sizes["tensor"])
                want = (*layers, 8 // sizes["expert"], *((d, f_) if keys[-1] == "wi" else (f_, d)))
                held = {s.data.shape for s in leaf.addressable_shards}
                assert held == {want}, (name, keys, held, want)
        results[variant, name] = (jax.device_get(state.params), losses, dropped)
    for (variant, name), (params, losses, dropped) in results.items():
        ref_params, ref_losses, ref_dropped = results[variant, "single"]
        assert dropped == ref_dropped and dropped[0] > 0, (name, dropped, ref_dropped)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=name)
    print("EXPERT-MESH-OK", {"/".join(k): v[1] + v[2] for k, v in results.items()})
    """
)


def test_expert_parallel_steps_on_eight_devices_equal_the_single_device_step() -> None:
    out = run_with_devices(EXPERT_MESH_SCRIPT, devices=8)
    assert "EXPERT-MESH-OK" in out
    assert "involuntary full rematerialization" not in out.lower(), out[-3000:]


def test_greedy_beam_and_an_ensemble_decode_with_experts() -> None:
    """Greedy output is the full forward pass's argmax on itself; beam 4 runs; an ensemble of an
    MoE member (top-1, ragged) and an MoE member (top-2, einsum) steps as its members' mean."""
    from conftest import step_by_step

    from transformer_jax.inference.decode import beam_search, greedy_decode
    from transformer_jax.model import Ensemble

    configs = (
        SMALL.replace(moe_num_experts=EXPERTS, moe_encoder_every=1, moe_eval_capacity_factor=2.0),
        SMALL.replace(
            moe_num_experts=EXPERTS,
            moe_experts_per_token=1,
            moe_decoder_every=1,
            moe_dispatch="ragged",
        ),
    )
    rng = np.random.default_rng(5)
    src = rng.integers(4, 61, (3, 6)).astype(np.int32)
    src[2, 3:] = PAD_ID
    members = []
    for config in configs:
        model = Transformer(config)
        members.append((model, nn.unbox(model.init(jax.random.key(0), src, src)["params"])))
    model, params = members[0]
    greedy = np.asarray(greedy_decode(model, params, jnp.asarray(src), max_length=12))
    logits = np.array(model.apply({"params": params}, src, greedy))
    # The decoders never emit PAD or BOS, and the last of max_length tokens is a forced EOS.
    logits[..., [PAD_ID, BOS_ID]] = -np.inf
    real = (greedy != PAD_ID)[:, :-1]
    np.testing.assert_array_equal(logits[:, :-1].argmax(-1)[real], greedy[:, :-1][real])
    tokens, scores = beam_search(model, params, jnp.asarray(src), beam_size=4, max_length=12)
    assert np.asarray(tokens).shape[0] == 3 and np.isfinite(np.asarray(scores)).all()

    tgt = rng.integers(4, 61, (3, 8)).astype(np.int32)
    expected = np.mean(
        [np.asarray(jax.nn.log_softmax(m.apply({"params": p}, src, tgt))) for m, p in members],
        axis=0,
    )
    ensemble_params = {f"members_{i}": p for i, (_, p) in enumerate(members)}
    steps = step_by_step(Ensemble(configs), ensemble_params, src, tgt, capacity=8)
    np.testing.assert_allclose(steps, expected, atol=1e-4)
