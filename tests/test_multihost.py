"""Multi-host training simulated on one machine: 2 processes x 2 CPU devices over gloo.

Each process is a fresh interpreter started with `jax.distributed.initialize` on 127.0.0.1, so
the real multi-process code paths run: per-process data shards, global arrays from process-local
rows, orbax saving from every process into one directory, the collective preemption decision.
Also: a checkpoint saved data-parallel on 4 devices restores onto an 8-device FSDP mesh.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import portpicker
import pytest
from conftest import ROOT, checkpoint_params, tiny_train_config

from transformer_jax.training.inputs import StreamPosition
from transformer_jax.training.loop import train_and_evaluate
from transformer_jax.workdir import Workdir

# argv: process id, process count, coordinator port, then the script's own arguments.
PREAMBLE = textwrap.dedent(
    """
    import json, os, sys, traceback
    from pathlib import Path
    import jax
    import numpy as np

    def exit_now(kind, value, tb):
        # A normal exit waits for every process at jax's shutdown barrier, so the runner would
        # only see a failed process once the others finished (or hung in a collective).
        traceback.print_exception(kind, value, tb)
        sys.stdout.flush()
        os._exit(1)

    sys.excepthook = exit_now
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    args = sys.argv[4:]
    # CPU devices of different processes talk over gloo (TCP), as hosts of a pod talk over DCN.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
            initialization_timeout=60,
        )
    assert jax.process_count() == nproc and jax.process_index() == pid

    def report(**values):
        print("RESULT " + json.dumps(values), flush=True)
    """
)


def run_processes(
    script: str, num_processes: int, devices_per_process: int, *args: str, timeout: float = 150
) -> list[dict]:
    """Run `script` as num_processes cooperating JAX processes; their report()s, by process.

    Every process is killed if one fails or the time runs out, so a crash cannot leave the
    others waiting in a collective.
    """
    port = str(portpicker.pick_unused_port())
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
    }
    common = [str(num_processes), port, *args]
    with tempfile.TemporaryDirectory() as logs:
        outputs = [Path(logs) / f"process_{i}.log" for i in range(num_processes)]
        procs = []
        try:
            for i, output in enumerate(outputs):
                with output.open("w") as sink:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-c", PREAMBLE + script, str(i), *common],
                            cwd=ROOT,
                            env=env,
                            stdout=sink,
                            stderr=subprocess.STDOUT,
                        )
                    )
            deadline = time.monotonic() + timeout
            while True:
                codes = [p.poll() for p in procs]  # poll each: it sets returncode
                if None not in codes or any(codes) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        texts = [output.read_text() for output in outputs]
    codes = [p.returncode for p in procs]
    if any(codes):
        tails = "\n".join(
            f"--- process {i} (rc {c}):\n{t[-2500:]}"
            for i, (c, t) in enumerate(zip(codes, texts, strict=True))
        )
        raise AssertionError(f"processes failed or timed out after {timeout}s:\n{tails}")
    return [
        json.loads(line.removeprefix("RESULT "))
        for text in texts
        for line in text.splitlines()
        if line.startswith("RESULT ")
    ]


STEP_SCRIPT = textwrap.dedent(
    """
    import optax
    import flax.linen as nn
    from jax.experimental import multihost_utils
    from transformer_jax.config import ModelConfig
    from transformer_jax.model import Transformer
    from transformer_jax import sharding
    from transformer_jax.state import init_state
    from transformer_jax.training import optim, step
    from transformer_jax.training.preemption import Preemption
    from transformer_jax.workdir import Workdir

    out = Path(args[0])
    assert jax.device_count() == 4, jax.devices()
    cfg = ModelConfig.preset("tiny", vocab_size=64, d_model=32, num_heads=4, d_ff=64,
                             dropout_rate=0.1)
    model = Transformer(cfg)
    # The same global batch on every process; each one passes only the rows its devices hold.
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(4, 64, (8, 8)).astype(np.int32),
             "targets": rng.integers(4, 64, (8, 8)).astype(np.int32)}
    # FSDP over all 4 devices: batch rows and parameters (and Adam state) split across both
    # processes, so the step's collectives and the checkpoint's shards cross processes.
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1})
    data = sharding.batch_sharding(mesh)
    index_map = data.addressable_devices_indices_map((8, 8))
    rows = sorted({r for index in index_map.values() for r in range(*index[0].indices(8))})
    assert rows == list(range(rows[0], rows[0] + 8 // nproc)), rows
    local = {k: v[rows[0]:rows[-1] + 1] for k, v in batch.items()}
    schedule = optim.paper_schedule(d_model=32, warmup_steps=10)
    losses = {}
    # SGD: the update is linear in the gradient, so parameters must agree to rounding (Adam's
    # first step, lr * sign(g), would turn rounding noise in zero gradients into +-lr).
    for name, opt in (("sgd", optax.sgd(schedule)),):
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            state, shardings = sharding.sharded_init(
                lambda: init_state(model, opt, jax.random.key(0), (1, 8), (1, 8)),
                mesh, sharding.DEFAULT_RULES)
            f = jax.jit(step.make_train_step(model, opt, schedule, label_smoothing=0.1),
                        in_shardings=(shardings, data, sharding.replicated(mesh)),
                        out_shardings=(shardings, sharding.replicated(mesh)),
                        donate_argnums=0)
            losses[name] = []

            def train(state, steps):
                for i in steps:
                    g = {k: jax.make_array_from_process_local_data(data, v)
                         for k, v in local.items()}
                    state, metrics = f(state, g, jax.random.key(i))
                    losses[name].append(float(metrics["loss_sum"]))
                return state

            state = train(state, range(2))
            # Every process saves its shards into one directory; a fresh state restores them.
            workdir = out / f"{name}_{nproc}proc"
            ckpt = Workdir(workdir).checkpoints(save_every=1, max_to_keep=1, async_save=True)
            ckpt.save(2, state, None)
            ckpt.wait()
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            del state
            state = ckpt.restore_state(2, abstract).state
            ckpt.close()
            state = train(state, range(2, 4))
        # Bytes of distinct parameter slices this process holds (a replicated leaf counts once).
        local_bytes = sum(
            sum({str(sh.index): sh.data.nbytes for sh in x.addressable_shards}.values())
            for x in jax.tree.leaves(state.params))
        whole_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
        # Parameters span both processes; gather them whole on every process to compare.
        params = multihost_utils.process_allgather(state.params, tiled=True)
        leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
        np.savez(out / f"{name}_{nproc}proc_{pid}.npz", **leaves)
    # A signal on one host stops every host, and only at an agreed step.
    preemption = Preemption(sync_every=5)
    preemption.requested = nproc > 1 and pid == 1
    stops = [preemption.should_stop(3), preemption.should_stop(5)]
    # A 'tensor' group spanning processes would get different rows from each: refused.
    try:
        sharding.check_mesh_feeds_consistent_rows(sharding.make_mesh({"data": 1, "tensor": -1}))
        refused = ""
    except ValueError as e:
        refused = str(e)
    report(pid=pid, losses=losses, stops=stops, local_fraction=local_bytes / whole_bytes,
           refused=refused)
    """
)


def _meta(workdir: Path, step: int) -> dict:
    """The meta record (RNG key, process count, stream position) of one checkpoint."""
    ckpt = Workdir(workdir).checkpoints(save_every=0, max_to_keep=10)
    try:
        return ckpt.meta(step)
    finally:
        ckpt.close()


def _load_npz(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[str(i)] for i in range(len(f.files))]


@pytest.mark.slow
def test_two_processes_step_equals_one_process_four_devices(tmp_path: Path) -> None:
    single = run_processes(STEP_SCRIPT, 1, 4, str(tmp_path))
    multi = run_processes(STEP_SCRIPT, 2, 2, str(tmp_path))
    assert len(single) == 1 and len(multi) == 2
    ref = single[0]["losses"]
    assert len(ref["sgd"]) == 4
    for result in multi:
        # Same program, same data, collectives over gloo instead of in-process; steps 3 and 4
        # run on the state each side saved and restored with orbax.
        np.testing.assert_allclose(result["losses"]["sgd"], ref["sgd"], rtol=1e-5)
        assert result["stops"] == [False, True], result
        # Each process holds about half the parameters (biases and LayerNorms are whole).
        assert result["local_fraction"] < 0.6, result
        assert "Keep 'tensor' within one host" in result["refused"], result
    assert single[0]["stops"] == [False, False]  # one process: nothing was signalled
    assert single[0]["refused"] == "" and single[0]["local_fraction"] == 1.0
    # Both processes wrote their own shards of the one checkpoint.
    state_dir = tmp_path / "sgd_2proc" / "checkpoints" / "2" / "state"
    assert {p.name for p in state_dir.glob("ocdbt.process_*")} >= {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }, sorted(p.name for p in state_dir.iterdir())
    ref_params = _load_npz(tmp_path / "sgd_1proc_0.npz")
    for pid in (0, 1):
        params = _load_npz(tmp_path / f"sgd_2proc_{pid}.npz")
        assert len(params) == len(ref_params)
        for a, b in zip(params, ref_params, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


LOOP_SCRIPT = textwrap.dedent(
    """
    sys.path.insert(0, "tests")
    from conftest import tiny_train_config
    from transformer_jax.training.loop import train_and_evaluate

    corpus, root, mode = Path(args[0]), Path(args[1]), args[2]
    config = tiny_train_config(corpus)
    config.data.test_split = ""
    config.train.num_steps = 4
    config.train.checkpoint_every = 2
    config.train.async_checkpointing = True
    config.train.eval_bleu_sentences = 8  # decoding gathers every host's rows
    runs = {"first": [("straight", None), ("resumed", 2)], "resume": [("resumed", None)]}[mode]
    for name, stop_after in runs:
        result = train_and_evaluate(config, root / name, stop_after=stop_after)
        report(pid=pid, run=name, step=result.step, stopped_by=result.stopped_by,
               metrics=result.final_metrics)
    """
)


@pytest.mark.slow
def test_two_processes_train_save_and_resume_like_an_uninterrupted_run(
    small_corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = run_processes(LOOP_SCRIPT, 2, 2, str(small_corpus), str(tmp_path), "first")
    resumed = run_processes(LOOP_SCRIPT, 2, 2, str(small_corpus), str(tmp_path), "resume")
    by_run: dict[str, list[dict]] = {}
    for result in first + resumed:
        by_run.setdefault(result["run"] + str(result["step"]), []).append(result)
    straight, stopped, finished = by_run["straight4"], by_run["resumed2"], by_run["resumed4"]
    assert [r["pid"] for r in straight] == [r["pid"] for r in finished] == [0, 1]
    assert {r["stopped_by"] for r in stopped} == {"stopped"}
    # Metrics are global values: both processes see the same, and resuming changes nothing.
    for key in ("train_loss", "train_grad_norm", "validation_loss", "validation_bleu"):
        values = {r["metrics"][key] for r in straight + finished}
        assert len(values) == 1, (key, values)
    assert np.isfinite(straight[0]["metrics"]["train_loss"])
    # One checkpoint directory written by both processes, each with its own data iterator state.
    data = tmp_path / "straight" / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    for a, b in zip(
        checkpoint_params(tmp_path / "straight", 4),
        checkpoint_params(tmp_path / "resumed", 4),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

    # One process (this one, one device) carries on from the 2-process checkpoint: the state
    # reshards, but grain's per-process iterator states cannot apply. Refused unless asked for,
    # saying what continuing costs; then it continues the stream where the hosts stopped.
    config = tiny_train_config(small_corpus)
    config.data.test_split = ""
    config.train.num_steps = 6
    config.train.eval_bleu_sentences = 8
    with pytest.raises(ValueError, match="saved by 2 process") as refused:
        train_and_evaluate(config, tmp_path / "straight")
    assert "config.data.reshard_on_resume" in str(refused.value)
    assert "re-reads at most" in str(refused.value) and "skips" in str(refused.value)
    config.data.reshard_on_resume = True
    with caplog.at_level(logging.WARNING, logger="transformer_jax"):
        carried_on = train_and_evaluate(config, tmp_path / "straight")
    assert carried_on.step == 6 and np.isfinite(carried_on.final_metrics["train_loss"])
    assert "saved by 2 process(es), this run has 1" in caplog.text
    # Where the two hosts stood at step 4: the new run starts at the first example one of them
    # had not read, not at example 0, and records that start for its own checkpoints.
    position = _meta(tmp_path / "straight", 4)["data"]
    point, _, _ = StreamPosition(**position).resume_point()
    assert point > 0 and f"continuing from example {point:,}" in caplog.text
    resumed_position = _meta(tmp_path / "straight", 6)["data"]
    assert resumed_position["start"] == point and len(resumed_position["read"]) == 1


CROSS_MESH_SCRIPT = textwrap.dedent(
    """
    sys.path.insert(0, "tests")
    from conftest import tiny_train_config
    from transformer_jax.data import pipeline
    from transformer_jax import experiment, sharding
    from transformer_jax.training.loop import train_and_evaluate
    from transformer_jax.training.program import build
    from transformer_jax.workdir import Workdir

    corpus, workdir, mode = Path(args[0]), Path(args[1]), args[2]
    config = tiny_train_config(corpus)
    config.data.test_split = ""
    config.train.num_steps = 4
    config.train.eval_bleu_sentences = 8
    if mode == "save":
        assert jax.device_count() == 4
        config.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
    else:
        assert jax.device_count() == 8
        config.mesh.shape = {"data": 2, "fsdp": 4, "tensor": 1}
    # The data iterator state is only meaningful for the same rows per step: 256 tokens make
    # 8 rows whether they are split over 4 or 8 devices.
    rows = [pipeline.rows_for_token_budget(256, 48, 1, multiple_of=n) for n in (4, 8)]
    assert config.data.tokens_per_batch == 256 and rows == [8, 8], rows

    def state_at(step):
        mesh = sharding.make_mesh(dict(config.mesh.shape))
        program = build(config, experiment.validate(config, jax.devices()), mesh)
        ckpt = Workdir(workdir).checkpoints(save_every=0, max_to_keep=5, async_save=False)
        restored = ckpt.restore_state(step, program.abstract_state).state
        ckpt.close()
        return restored

    if mode == "save":
        result = train_and_evaluate(config, workdir, stop_after=2)
        assert result.step == 2, result
        saved = state_at(2)
        np.savez(workdir / "saved.npz",
                 **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(saved))})
        report(mode=mode, step=result.step)
    else:
        restored = state_at(2)
        with np.load(workdir / "saved.npz") as f:
            saved = [f[str(i)] for i in range(len(f.files))]
        leaves = jax.tree.leaves(restored)
        assert len(leaves) == len(saved)
        for a, b in zip(leaves, saved):
            np.testing.assert_array_equal(np.asarray(a), b)
        per_device = sharding.bytes_per_device(restored.params)
        total = sum(x.nbytes for x in jax.tree.leaves(restored.params))
        specs = {str(x.sharding.spec) for x in jax.tree.leaves(restored.params)}
        result = train_and_evaluate(config, workdir)
        report(mode=mode, step=result.step, loss=result.final_metrics["train_loss"],
               validation_loss=result.final_metrics["validation_loss"],
               max_fraction=max(per_device.values()) / total, devices=len(per_device),
               fsdp=any("fsdp" in s for s in specs))
    """
)


@pytest.mark.slow
def test_checkpoint_from_four_devices_data_parallel_restores_onto_eight_with_fsdp(
    small_corpus: Path, tmp_path: Path
) -> None:
    (saved,) = run_processes(CROSS_MESH_SCRIPT, 1, 4, str(small_corpus), str(tmp_path), "save")
    assert saved["step"] == 2
    (resumed,) = run_processes(CROSS_MESH_SCRIPT, 1, 8, str(small_corpus), str(tmp_path), "restore")
    assert resumed["step"] == 4
    assert np.isfinite(resumed["loss"]) and np.isfinite(resumed["validation_loss"])
    # The restored parameters are split over fsdp=4 (replicated over data=2), not whole.
    assert resumed["fsdp"] and resumed["devices"] == 8
    assert resumed["max_fraction"] < 0.5, resumed


TRANSLATE_SCRIPT = textwrap.dedent(
    """
    from transformer_jax import load

    workdir, sentences = Path(args[0]), json.loads(args[1])
    translator = load(workdir)
    # 2 rows per process and batch: several batches, the last one padded on every process.
    outputs = {method: translator.translate(sentences, method=method, batch_size=2)
               for method in ("greedy", "beam")}
    report(pid=pid, devices=jax.device_count(), outputs=outputs)
    """
)


@pytest.mark.slow
def test_translator_on_two_processes_returns_every_translation_on_every_process(
    trained_workdir: Path,
) -> None:
    from transformer_jax import load

    sentences = [
        "The doctors can drink the tomato juice.",
        "",
        "A friendly student will pick up sixty-nine men.",
        "Tomorrow the teacher buys the red bags.",
        "She reads the newspaper in the library.",
        "   ",
        "We visited the grandmother on the third of May.",
    ]
    args = (str(trained_workdir), json.dumps(sentences))
    (one,) = run_processes(TRANSLATE_SCRIPT, 1, 2, *args)
    two = run_processes(TRANSLATE_SCRIPT, 2, 2, *args)
    assert one["devices"] == 2 and [r["devices"] for r in two] == [4, 4]
    here = load(trained_workdir)
    for method in ("greedy", "beam"):
        expected = here.translate(sentences, method=method)
        assert len(expected) == len(sentences) and expected[1] == expected[5] == ""
        assert one["outputs"][method] == expected, method
        for result in two:  # each process decoded half and gathered the rest
            assert result["outputs"][method] == expected, (method, result["pid"])


LOST_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import tiny_train_config

def get_config():
    config = tiny_train_config(Path({corpus!r}))
    config.train.num_steps = 100000
    config.train.log_every = 1
    config.train.checkpoint_every = 0
    config.data.test_split = ""
    return config
"""
PEER_TIMEOUT = 8


@pytest.mark.slow
@pytest.mark.parametrize(("signal_name", "victim"), [("SIGSTOP", 1), ("SIGKILL", 0)])
def test_a_lost_process_makes_the_others_exit_in_bounded_time(
    signal_name: str, victim: int, small_corpus: Path, tmp_path: Path
) -> None:
    import signal

    config_file = tmp_path / "config.py"
    config_file.write_text(LOST_CONFIG.format(tests=str(ROOT / "tests"), corpus=str(small_corpus)))
    port = str(portpicker.pick_unused_port())
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    for i, log_path in enumerate(logs):
        with log_path.open("w") as sink:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "train.py",
                        "--distributed",
                        f"--coordinator_address=127.0.0.1:{port}",
                        "--num_processes=2",
                        f"--process_id={i}",
                        f"--peer_timeout={PEER_TIMEOUT}",
                        f"--config={config_file}",
                        f"--workdir={tmp_path / 'run'}",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    survivor = procs[1 - victim]
    try:
        deadline = time.monotonic() + 240  # two processes compiling on a busy 2-core host
        while "step 3:" not in logs[victim].read_text():  # both are training by then
            alive = all(p.poll() is None for p in procs)
            assert alive and time.monotonic() < deadline, [t.read_text()[-2000:] for t in logs]
            time.sleep(0.2)
        procs[victim].send_signal(getattr(signal, signal_name))
        lost_at = time.monotonic()
        code = survivor.wait(timeout=PEER_TIMEOUT + 30)
        waited = time.monotonic() - lost_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = logs[1 - victim].read_text()
    assert code != 0 and waited <= PEER_TIMEOUT + 15, (code, waited, text[-3000:])
    if victim == 1:
        # The watchdog: a hung process keeps its sockets open, so the collective would wait
        # for good; the survivor names it instead.
        assert code == 3, text[-3000:]
        assert "error: process 0: process 1 of 2 has sent no heartbeat for" in text
    else:
        # The coordinator itself is gone: jax's client ends the process (seen here within
        # seconds), or else the watchdog does when the service stays unreachable.
        assert (
            "JAX distributed service detected fatal errors" in text
            or "lost the coordination service on process 0" in text
        ), text[-3000:]
