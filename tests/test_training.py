"""Training: schedule, loss, accumulation, sharded step, resume, SIGTERM, configs, errors."""

from __future__ import annotations

import importlib.util
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import BAD_CONFIG_VALUES, ROOT, checkpoint_params, tiny_train_config, with_value
from etils import epath

from transformer_jax import cpu_malloc, experiment
from transformer_jax.config import PAD_ID, ModelConfig
from transformer_jax.model import Transformer
from transformer_jax.state import init_state
from transformer_jax.training import loss, optim, step
from transformer_jax.training.loop import train_and_evaluate

SMALL = ModelConfig.preset(
    "tiny",
    vocab_size=40,
    d_model=16,
    num_heads=2,
    d_ff=32,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
    max_len=32,
)


def test_paper_schedule_values() -> None:
    schedule = optim.paper_schedule(d_model=512, warmup_steps=4000)
    # Update i runs as paper step i + 1.
    peak = float(schedule(3999))
    assert peak == pytest.approx(512**-0.5 * 4000**-0.5, rel=1e-6)
    assert peak == pytest.approx(6.988e-4, abs=1e-6)
    assert float(schedule(0)) == pytest.approx(512**-0.5 * 1 * 4000**-1.5, rel=1e-6)
    assert float(schedule(1999)) == pytest.approx(512**-0.5 * 2000 * 4000**-1.5, rel=1e-6)
    assert float(schedule(15999)) == pytest.approx(512**-0.5 * 16000**-0.5, rel=1e-6)
    assert float(schedule(15999)) == pytest.approx(peak / 2, rel=1e-6)
    scaled = optim.paper_schedule(d_model=512, warmup_steps=4000, scale=2.0)
    assert float(scaled(3999)) == pytest.approx(2 * peak, rel=1e-6)


def test_label_smoothed_loss_matches_formula() -> None:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    targets = jnp.array([[4, 5, PAD_ID], [6, 1, 2]])
    sums = loss.loss_sums(logits, targets, label_smoothing=0.1)
    log_p = np.asarray(jax.nn.log_softmax(logits))
    real = np.asarray(targets) != PAD_ID
    nll = -np.take_along_axis(log_p, np.asarray(targets)[..., None], -1)[..., 0]
    smoothed = 0.9 * nll - 0.1 * log_p.mean(-1)
    assert float(sums["num_tokens"]) == 5
    np.testing.assert_allclose(sums["nll_sum"], nll[real].sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["loss_sum"], smoothed[real].sum(), rtol=1e-5)
    summary = loss.summarize(sums)
    np.testing.assert_allclose(summary["perplexity"], np.exp(nll[real].mean()), rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothed_loss_gradient_matches_optax(smoothing: float) -> None:
    # The hand-written backward pass against autodiff of optax's smoothed cross-entropy,
    # with padding, large logits (softmax saturates) and both outputs carrying cotangents.
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(scale=8.0, size=(3, 4, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 4)), jnp.int32).at[0, 3].set(PAD_ID)
    w_smoothed, w_nll = (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(2))

    def ours(z: jax.Array) -> jax.Array:
        smoothed, nll, _ = loss.token_losses(z, targets, smoothing)
        return jnp.sum(smoothed * w_smoothed) + jnp.sum(nll * w_nll)

    def reference(z: jax.Array) -> jax.Array:
        one_hot = jax.nn.one_hot(targets, 11)
        weights = (targets != PAD_ID).astype(jnp.float32)
        smoothed = optax.softmax_cross_entropy(z, optax.smooth_labels(one_hot, smoothing))
        nll = optax.softmax_cross_entropy(z, one_hot)
        return jnp.sum(smoothed * weights * w_smoothed) + jnp.sum(nll * weights * w_nll)

    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-6)
    # bfloat16 logits give bfloat16 gradients, close to the float32 ones.
    grad_bf16 = jax.grad(ours)(logits.astype(jnp.bfloat16))
    assert grad_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        grad_bf16.astype(jnp.float32), jax.grad(reference)(logits), atol=2e-2
    )


def _examples(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    lengths = [(5, 4), (3, 6), (6, 5), (4, 3)]
    return [
        (rng.integers(4, 40, s).astype(np.int32), rng.integers(4, 40, t).astype(np.int32))
        for s, t in lengths
    ]


def _pad(rows: list[np.ndarray], length: int) -> np.ndarray:
    return np.stack([np.pad(r, (0, length - len(r))) for r in rows]).astype(np.int32)


def _packed(examples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pack examples two per row, with segment ids and restarting positions."""
    batch: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "inputs",
            "targets",
            "inputs_segment_ids",
            "targets_segment_ids",
            "inputs_positions",
            "targets_positions",
        )
    }
    for pair in (examples[:2], examples[2:]):
        for side, key in ((0, "inputs"), (1, "targets")):
            seqs = [p[side] for p in pair]
            batch[key].append(np.concatenate(seqs))
            batch[f"{key}_segment_ids"].append(
                np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)])
            )
            batch[f"{key}_positions"].append(np.concatenate([np.arange(len(s)) for s in seqs]))
    return {k: _pad(v, 12) for k, v in batch.items()}


def test_packed_loss_equals_unpacked_loss() -> None:
    rng = np.random.default_rng(1)
    examples = _examples(rng)
    model = Transformer(SMALL)
    params = nn.unbox(
        model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))[
            "params"
        ]
    )
    eval_step = step.make_eval_step(model, label_smoothing=0.1)
    unpacked = {
        "inputs": _pad([e[0] for e in examples], 8),
        "targets": _pad([e[1] for e in examples], 8),
    }
    a = eval_step(params, unpacked)
    b = eval_step(params, _packed(examples))
    assert float(a["num_tokens"]) == float(b["num_tokens"]) == 18
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(a["nll_sum"], b["nll_sum"], rtol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_equals_one_large_batch(k: int) -> None:
    rng = np.random.default_rng(2)
    model = Transformer(SMALL)
    # SGD: the update is linear in the gradient, so equal updates mean equal gradients. (Adam's
    # first step is lr * sign(g), which turns rounding noise in near-zero gradients into +-lr.)
    schedule = optim.paper_schedule(d_model=16, warmup_steps=5)
    optimizer = optax.sgd(schedule)
    state = nn.unbox(init_state(model, optimizer, jax.random.key(0), (1, 4), (1, 4)))
    # Uneven token counts per row, so per-micro-batch means would differ from the true mean.
    inputs = rng.integers(4, 40, (8, 6)).astype(np.int32)
    targets = rng.integers(4, 40, (8, 5)).astype(np.int32)
    for row in range(8):
        targets[row, rng.integers(1, 5) :] = PAD_ID
    batch = {"inputs": inputs, "targets": targets}
    big = step.make_train_step(model, optimizer, schedule, label_smoothing=0.1)
    accumulated = step.make_train_step(
        model, optimizer, schedule, label_smoothing=0.1, grad_accum_steps=k
    )
    state_a, metrics_a = jax.jit(big)(state, batch, jax.random.key(1))
    state_b, metrics_b = jax.jit(accumulated)(state, batch, jax.random.key(1))
    np.testing.assert_allclose(metrics_a["loss_sum"], metrics_b["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


MESH_SCRIPT = textwrap.dedent(
    """
    import math
    import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
    from transformer_jax.config import ModelConfig
    from transformer_jax.model import Transformer
    from transformer_jax import sharding
    from transformer_jax.state import init_state
    from transformer_jax.training import optim, step

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig.preset("tiny", vocab_size=64, d_model=32, num_heads=4, d_ff=64,
                             dropout_rate=0.1)
    models = {"plain": Transformer(cfg),
              # Scanned layers and full remat (dropout replayed) under the same shardings.
              "scan_remat": Transformer(cfg.replace(scan_layers=True, remat="full"))}
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(4, 64, (8, 8)).astype(np.int32),
             "targets": rng.integers(4, 64, (8, 8)).astype(np.int32)}
    adam, schedule = optim.make_optimizer(d_model=32, warmup_steps=10)
    rules = sharding.DEFAULT_RULES
    STRATEGIES = {
        "single": ({"data": 1}, jax.devices()[:1]),
        "data8": ({"data": -1}, None),
        "fsdp8": ({"fsdp": -1}, None),
        "data2_tensor4": ({"data": 2, "tensor": 4}, None),
        "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, None),
    }

    def expected_bytes(init_fn, sizes):
        # Per-device bytes predicted from each leaf's logical axis names and the rules alone:
        # a dimension whose name maps to mesh axes is divided by their sizes.
        abstract = jax.eval_shape(init_fn)
        specs = jax.tree.leaves(nn.get_partition_spec(abstract),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
        leaves = [x.value if boxed(x) else x for x in jax.tree.leaves(abstract, is_leaf=boxed)]
        assert len(specs) == len(leaves)
        table = dict(rules)
        total = 0
        for leaf, spec in zip(leaves, specs):
            divisor = 1
            for name in spec:
                axes = table.get(name) if name is not None else None
                for axis in (axes if isinstance(axes, tuple) else (axes,)):
                    divisor *= sizes[axis] if axis is not None else 1
            nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
            assert nbytes % divisor == 0, (leaf.shape, spec)
            total += nbytes // divisor
        return total

    # SGD makes the update linear in the gradient, so parameters must agree to rounding.
    # Adam's first step is lr * sign(g): the key biases' gradient is exactly zero in theory
    # (softmax ignores a per-query shift), so rounding noise there becomes +-lr; the losses,
    # which those biases cannot move, are compared instead.
    runs = {
        "sgd": [("plain", name) for name in STRATEGIES]
        + [("scan_remat", "single"), ("scan_remat", "data2_fsdp2_tensor2")],
        "adam": [("plain", "single"), ("plain", "fsdp8"), ("plain", "data2_fsdp2_tensor2")],
    }
    for opt_name, opt in (("sgd", optax.sgd(schedule)), ("adam", adam)):
        results = {}
        for variant, name in runs[opt_name]:
            model = models[variant]
            shape, devices = STRATEGIES[name]
            mesh = sharding.make_mesh(shape, devices)
            init_fn = lambda: init_state(model, opt, jax.random.key(0), (1, 8), (1, 8))
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                state, shardings = sharding.sharded_init(init_fn, mesh, rules)
                data = sharding.batch_sharding(mesh)
                f = jax.jit(step.make_train_step(model, opt, schedule, label_smoothing=0.1),
                            in_shardings=(shardings, data, sharding.replicated(mesh)),
                            out_shardings=(shardings, sharding.replicated(mesh)),
                            donate_argnums=0)
                losses = []
                for _ in range(2):
                    g = {k: jax.make_array_from_process_local_data(data, v)
                         for k, v in batch.items()}
                    state, metrics = f(state, g, jax.random.key(1))
                    losses.append(float(metrics["loss_sum"]))
                # Params and optimizer state together, after two steps: still where the
                # rules put them, every device holding what the logical names predict.
                held = sharding.bytes_per_device(state)
                predicted = expected_bytes(init_fn, dict(mesh.shape))
                assert len(held) == mesh.size, (name, held)
                assert set(held.values()) == {predicted}, (name, held, predicted)
            results[variant, name] = (jax.device_get(state.params), losses, predicted)
        for (variant, name), (params, losses, per_device) in results.items():
            ref_params, ref_losses, _ = results[variant, "single"]
            np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, err_msg=name)
            if opt_name == "sgd":
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
                    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        whole = results["plain", "single"][2]
        # Independent of the prediction: data parallelism replicates everything, and the
        # model-sharded strategies leave each device a fraction of the whole (the unsplit
        # rest is biases, LayerNorm scales and Adam's step count).
        per_device = {name: r[2] for (variant, name), r in results.items() if variant == "plain"}
        bound = {"data8": 1.0, "fsdp8": 0.15, "data2_tensor4": 0.3, "data2_fsdp2_tensor2": 0.3}
        for name, value in per_device.items():
            if name != "single":
                assert value <= bound[name] * whole, (name, value, whole)
        if "data8" in per_device:
            assert per_device["data8"] == whole
        print("MESH-OK", opt_name,
              {"/".join(k): (v[1][-1], v[2] / whole) for k, v in results.items()})
    """
)


def run_with_devices(script: str, devices: int, timeout: int = 300) -> str:
    """Run a script in a fresh interpreter that sees `devices` fake CPU devices."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        # XLA's warnings must reach stderr (a CLI test earlier in the session may raise this).
        "TF_CPP_MIN_LOG_LEVEL": "0",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_every_sharding_strategy_on_eight_devices_equals_the_single_device_step() -> None:
    out = run_with_devices(MESH_SCRIPT, devices=8)
    assert out.count("MESH-OK") == 2
    # XLA says this when a sharding forces it to replicate a whole activation or weight on
    # every device; the model's activation and embedding constraints exist to prevent it.
    assert "involuntary full rematerialization" not in out.lower(), out[-3000:]


@pytest.mark.slow
def test_resume_reaches_exactly_the_uninterrupted_parameters(
    small_corpus: Path, tmp_path: Path
) -> None:
    config = tiny_train_config(small_corpus)
    config.data.test_split = ""
    straight = train_and_evaluate(config, tmp_path / "straight")
    assert straight.stopped_by == "finished" and straight.step == 6

    interrupted = train_and_evaluate(config, tmp_path / "resumed", stop_after=3)
    assert interrupted.stopped_by == "stopped" and interrupted.step == 3
    resumed = train_and_evaluate(config, tmp_path / "resumed")
    assert resumed.step == 6
    for a, b in zip(
        checkpoint_params(tmp_path / "straight", 6),
        checkpoint_params(tmp_path / "resumed", 6),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(straight.final_metrics["validation_loss"])


@pytest.mark.slow
def test_default_style_run_evaluates_and_writes_results(small_corpus: Path, tmp_path: Path) -> None:
    config = tiny_train_config(small_corpus)
    result = train_and_evaluate(config, tmp_path / "run")
    workdir = tmp_path / "run"
    for name in (
        "model_config.json",
        "tokenizer.model",
        "config.json",
        "results.json",
        "test.hyp.txt",
    ):
        assert (workdir / name).exists(), name
    assert len((workdir / "test.hyp.txt").read_text().splitlines()) == 32
    assert 0.0 <= result.final_metrics["test_bleu"] <= 100.0
    assert list((workdir / "tensorboard").iterdir())
    if Path("/proc/self/statm").exists():  # host memory is part of every log line
        # The figure is this pytest process's resident set, which earlier tests have grown, so
        # it is bounded by the process's own peak (ru_maxrss, KiB on Linux), not by the model.
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        assert 0.05 < result.final_metrics["train_host_rss_gb"] <= peak_gb * 1.001


SIGTERM_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_train_config
from pathlib import Path

def get_config():
    config = tiny_train_config(Path({corpus!r}))
    config.train.num_steps = 100000
    config.train.checkpoint_every = 0
    config.train.log_every = 1
    return config
"""


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(small_corpus: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "sigterm_config.py"
    config_file.write_text(
        SIGTERM_CONFIG.format(tests=str(ROOT / "tests"), corpus=str(small_corpus))
    )
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", f"--config={config_file}", f"--workdir={workdir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.stdout is not None
    deadline = time.time() + 240
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 3:" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(seen[-30:])
    rest, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, "".join(seen[-20:]) + rest[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 3, steps
    assert "preempted" in rest
    child_env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if cpu_malloc.tuned_env(child_env, glibc=cpu_malloc.is_glibc(), accelerator=False):
        # train.py restarted itself with the malloc tunables (same pid: SIGTERM still landed).
        assert "restarted with GLIBC_TUNABLES" in "".join(seen), "".join(seen[:20])


def _load_config_file(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[!_]*.py")), ids=lambda p: p.stem)
def test_every_config_file_loads_and_validates(path: Path, tmp_path: Path) -> None:
    config = _load_config_file(path)
    if config.get("model_from_workdir"):
        # configs/finetune.py takes the model from the workdir it trains in: a tiny one here.
        ModelConfig.preset("tiny").save(tmp_path / "model_config.json")
        config = experiment.adopt_workdir_model(config, epath.Path(tmp_path / "model_config.json"))
    model_config = experiment.validate(config, jax.devices())
    assert isinstance(model_config, ModelConfig)
    # The model section is the whole ModelConfig: no field copied by hand or forgotten.
    assert set(config.model.keys()) == set(model_config.to_dict())


def test_paper_configs_carry_the_papers_recipe() -> None:
    base = _load_config_file(ROOT / "configs" / "wmt14_ende_base.py")
    big = _load_config_file(ROOT / "configs" / "wmt14_ende_big.py")
    assert experiment.validate(base) == ModelConfig.preset("base", dtype="bfloat16")
    assert experiment.validate(big) == ModelConfig.preset("big", dtype="bfloat16")
    for config in (base, big):
        assert (config.optim.b1, config.optim.b2, config.optim.eps) == (0.9, 0.98, 1e-9)
        assert config.optim.warmup_steps == 4000
        assert config.optim.learning_rate_scale == 1.0
        assert config.optim.label_smoothing == 0.1
        assert config.data.tokens_per_batch == 25_000
        assert config.decode.extra_length == 50
        # Section 6.1's reporting: beam 4, alpha 0.6, checkpoints 10 minutes apart averaged.
        assert (config.decode.beam_size, config.decode.alpha) == (4, 0.6)
        assert config.train.average_every == config.train.checkpoint_every
    assert (base.train.num_steps, big.train.num_steps) == (100_000, 300_000)
    assert (base.train.average_last, big.train.average_last) == (5, 20)


@pytest.mark.parametrize(("field", "value", "message"), BAD_CONFIG_VALUES)
def test_bad_config_values_stop_before_compilation(
    field: str, value: object, message: str, small_corpus: Path, tmp_path: Path
) -> None:
    config = with_value(tiny_train_config(small_corpus), field, value)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_workdir_of_another_model_is_refused(small_corpus: Path, tmp_path: Path) -> None:
    config = tiny_train_config(small_corpus)
    workdir = tmp_path / "run"
    workdir.mkdir()
    ModelConfig.preset("tiny").save(workdir / "model_config.json")
    with pytest.raises(ValueError, match="different model"):
        train_and_evaluate(config, workdir)


def test_missing_data_file_is_named(small_corpus: Path, tmp_path: Path) -> None:
    config = tiny_train_config(small_corpus)
    config.data.options.source_path = str(tmp_path / "nowhere.{split}.en")
    with pytest.raises((ValueError, FileNotFoundError), match="nowhere"):
        train_and_evaluate(config, tmp_path / "run")


def test_checkpoint_round_trips_state_rng_and_iterator(tmp_path: Path) -> None:
    import grain

    from transformer_jax.workdir import Workdir

    def numbers() -> grain.DatasetIterator:
        return iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())

    iterator = numbers()
    for _ in range(5):
        next(iterator)
    state = {"step": jnp.array(7), "params": {"w": jnp.arange(6.0).reshape(2, 3)}}
    rng = jax.random.key(1234)
    ckpt = Workdir(tmp_path).checkpoints(save_every=5, max_to_keep=2, async_save=True)
    assert not ckpt.due(7)  # not a multiple of 5
    assert ckpt.due(10)
    ckpt.save(10, state, iterator, rng)
    assert not ckpt.due(10)  # saved already
    expected_next = [next(iterator) for _ in range(3)]  # the save must not see these
    ckpt.wait()
    restored_iterator = numbers()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    back = ckpt.restore_state(10, abstract)
    ckpt.restore_iterator(10, restored_iterator)
    restored, restored_rng = back.state, back.rng
    ckpt.close()
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert [next(restored_iterator) for _ in range(3)] == expected_next
    assert restored_rng is not None
    np.testing.assert_array_equal(jax.random.key_data(restored_rng), jax.random.key_data(rng))


def test_cloud_workdir_stays_a_url_and_its_files_go_through_epath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from etils import epath

    from transformer_jax.workdir import Workdir, workdir_path

    # pathlib made gs://bucket/run a local ./gs:/bucket/run on each host of a pod.
    url = workdir_path("gs://bucket/run")
    assert os.fspath(url) == "gs://bucket/run"
    assert os.fspath(url / Workdir.CHECKPOINTS) == "gs://bucket/run/checkpoints"
    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir_path("runs/x")) == str(tmp_path / "runs" / "x")

    # Stand-in bucket: epath's gs:// backend redirected to a local folder. With TensorFlow
    # installed, epath would route gs:// to tf.io.gfile and bypass the mock (real GCS).
    monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)
    bucket = tmp_path / "bucket-store"

    def local(path: object) -> str:
        text = os.fspath(path)  # type: ignore[call-overload]
        return text.replace("gs://", f"{bucket}/") if text.startswith("gs://") else text

    def one(fn, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(local(path), local(dst), *args, **kwargs)

    mocks = dict.fromkeys(("open", "exists", "isdir", "listdir", "makedirs", "mkdir"), one)
    with epath.testing.mock_epath(**mocks, replace=two, rename=two):  # type: ignore[arg-type]
        url.mkdir(parents=True)  # as train_and_evaluate does first
        cloud = Workdir("gs://bucket/run")
        cloud.write_model_config(SMALL)
        cloud.write_model_config(SMALL)  # the same model: accepted
        with pytest.raises(ValueError, match=r"gs://bucket/run/model_config\.json"):
            cloud.write_model_config(SMALL.replace(d_ff=64))
        assert cloud.steps() == []
        with pytest.raises(FileNotFoundError, match="gs://bucket/run/checkpoints: no checkpoints"):
            cloud.restore_params(None, {})
    assert ModelConfig.load(bucket / "bucket" / "run" / "model_config.json") == SMALL
    assert not (tmp_path / "gs:").exists()


def test_mesh_whose_tensor_groups_span_processes_is_refused() -> None:
    from transformer_jax import sharding

    # Process index per device, laid out (data, fsdp, expert, tensor).
    sharding.check_rows_stay_on_one_process(np.array([0, 0, 1, 1]).reshape(2, 1, 1, 2))
    sharding.check_rows_stay_on_one_process(np.array([0, 0, 1, 1]).reshape(1, 2, 1, 2))
    sharding.check_rows_stay_on_one_process(np.array([0, 0, 1, 1]).reshape(1, 1, 2, 2))
    sharding.check_rows_stay_on_one_process(np.zeros((1, 1, 1, 8), int))
    with pytest.raises(ValueError, match=r"row block 0 .*processes \[0, 1\].*Keep 'tensor'"):
        sharding.check_rows_stay_on_one_process(np.array([0, 0, 1, 1]).reshape(1, 1, 1, 4))
    with pytest.raises(ValueError, match="row block 1"):
        sharding.check_rows_stay_on_one_process(np.array([0, 0, 0, 1]).reshape(2, 1, 1, 2))
    with pytest.raises(ValueError, match=r"'expert': 2, 'tensor': 2}: .*row block 1"):
        sharding.check_rows_stay_on_one_process(np.array([0, 0, 0, 1]).reshape(1, 1, 2, 2))
    # A real single-process mesh always passes.
    sharding.check_mesh_feeds_consistent_rows(sharding.make_mesh({"data": -1}))
