"""Faults injected from outside: NaN steps, damaged checkpoints, bytes that are not UTF-8."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, checkpoint_params, tiny_train_config
from jax.experimental import io_callback

from transformer_jax import load
from transformer_jax.training import optim
from transformer_jax.training.guard import NonFiniteError
from transformer_jax.training.loop import train_and_evaluate
from transformer_jax.workdir import DAMAGED_CHECKPOINTS, UnreadableCheckpointError, Workdir


def nan_updates_at(bad_steps: set[int]) -> optax.GradientTransformation:
    """An optax stage that makes the update NaN at the given 1-based steps of this process.

    The step number is counted on the host (io_callback), not in the optimizer state: a skipped
    step restores that state, and a count kept there would make every later step NaN too.
    """
    calls = itertools.count(1)

    def poisoned(_: jax.Array) -> np.ndarray:
        return np.asarray(next(calls) in bad_steps)

    def update(updates: optax.Updates, state: optax.OptState, params: object = None) -> tuple:
        del params
        bad = io_callback(poisoned, jax.ShapeDtypeStruct((), jnp.bool_), state, ordered=True)
        return jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates), state

    return optax.GradientTransformation(lambda params: jnp.zeros(()), update)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[int]]:
    """Steps (1-based, counted in this process) whose update becomes NaN: add them to the set."""
    bad: set[int] = set()
    original = optim.optimizer_from_config

    def with_poison(optim_config, d_model):  # type: ignore[no-untyped-def]
        optimizer, schedule = original(optim_config, d_model)
        return optax.chain(optimizer, nan_updates_at(bad)), schedule

    monkeypatch.setattr(optim, "optimizer_from_config", with_poison)
    yield bad


def test_adam_eps_zero_nan_never_reaches_a_checkpoint(small_corpus: Path, tmp_path: Path) -> None:
    # The run: eps 0 makes Adam's first update 0/0 wherever a gradient is exactly 0
    # (the key projection's bias: softmax ignores a per-query shift); saves every 5 steps,
    # metrics read every 7. Before, checkpoint 5 held NaN and the run said it was "kept".
    config = tiny_train_config(small_corpus)
    config.optim.eps = 0.0
    config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 10, 5, 7
    with pytest.raises(NonFiniteError, match=r"^step 1: .*no finite checkpoint exists yet"):
        train_and_evaluate(config, tmp_path / "run")
    assert Workdir(tmp_path / "run").steps() == []


def test_nan_after_a_checkpoint_names_the_step_and_keeps_the_finite_one(
    small_corpus: Path, tmp_path: Path, poison: set[int]
) -> None:
    poison.add(7)
    config = tiny_train_config(small_corpus)
    config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 10, 5, 7
    config.train.async_checkpointing = True
    with pytest.raises(NonFiniteError) as e:
        train_and_evaluate(config, tmp_path / "run")
    message = str(e.value)
    assert message.startswith("step 7: the loss, gradients or update became NaN/inf")
    assert f"newest finite checkpoint is step 5 ({tmp_path / 'run' / 'checkpoints' / '5'})" in (
        message
    )
    assert "optim.skip_nonfinite_updates=True" in message
    assert Workdir(tmp_path / "run").steps() == [5]
    assert all(np.isfinite(x).all() for x in checkpoint_params(tmp_path / "run", 5))


def test_skipping_leaves_the_state_unchanged_and_counts_the_steps(
    small_corpus: Path, tmp_path: Path, poison: set[int], caplog: pytest.LogCaptureFixture
) -> None:
    poison.update({4, 5, 6})
    config = tiny_train_config(small_corpus)
    config.data.test_split = ""
    config.optim.skip_nonfinite_updates = True
    config.optim.max_nonfinite_in_a_row = 4
    # Saves (every 3) fall between log lines (every 4): each line still counts its interval.
    config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 8, 3, 4
    config.train.max_to_keep = 5
    config.train.async_checkpointing = True
    with caplog.at_level(logging.INFO, logger="transformer_jax"):
        result = train_and_evaluate(config, tmp_path / "run")
    assert result.stopped_by == "finished" and result.step == 8
    assert result.final_metrics["train_skipped_total"] == 3
    lines = [line for line in caplog.text.splitlines() if "skipped_steps=" in line]
    assert ["step 4:" in lines[0], "step 8:" in lines[1]] == [True, True], lines
    assert "skipped_steps=1," in lines[0] and "skipped_steps=2," in lines[1], lines
    assert np.isfinite(result.final_metrics["train_loss"])
    # Steps 4 to 6 changed nothing: the parameters saved after step 6 are those of step 3.
    assert Workdir(tmp_path / "run").steps() == [3, 6, 8]
    saved = {step: checkpoint_params(tmp_path / "run", step) for step in (3, 6, 8)}
    for a, b in zip(saved[3], saved[6], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(saved[6], saved[8], strict=True))
    # The count survives a resume (it is part of the checkpoint).
    config.train.num_steps = 9
    resumed = train_and_evaluate(config, tmp_path / "run")
    assert resumed.final_metrics["train_skipped_total"] == 3


def test_too_many_skipped_steps_in_a_row_halt_the_run(
    small_corpus: Path, tmp_path: Path, poison: set[int]
) -> None:
    poison.update({3, 4, 5})
    config = tiny_train_config(small_corpus)
    config.optim.skip_nonfinite_updates = True
    config.optim.max_nonfinite_in_a_row = 3
    config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 10, 2, 5
    with pytest.raises(NonFiniteError) as e:
        train_and_evaluate(config, tmp_path / "run")
    message = str(e.value)
    assert message.startswith("3 non-finite steps in a row up to step 5")
    assert "first non-finite step of this run was 3" in message
    assert "newest finite checkpoint is step 4" in message
    assert Workdir(tmp_path / "run").steps() == [2, 4]


def test_a_stop_never_saves_a_poisoned_state(
    small_corpus: Path, tmp_path: Path, poison: set[int]
) -> None:
    # The save on the way out (SIGTERM and stop_after take the same path) checks first too.
    poison.add(2)
    config = tiny_train_config(small_corpus)
    config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 10, 0, 100
    with pytest.raises(NonFiniteError, match=r"^step 2: .*no finite checkpoint exists yet"):
        train_and_evaluate(config, tmp_path / "run", stop_after=3)
    assert Workdir(tmp_path / "run").steps() == []


def test_stream_position_says_where_to_continue_and_what_it_costs() -> None:
    from transformer_jax.training.inputs import StreamPosition

    # 2 processes from example 10: p0 read 10, 12, ..., 18 (5), p1 read 11, 13, 15 (3); p1 is
    # behind, so the stream continues at 17: p0's 18 is read again, and 1 + 2 kept examples
    # were waiting in rows not trained on yet.
    position = StreamPosition(start=10, read=[5, 3], kept=[5, 3], emitted=[4, 1])
    assert position.resume_point() == (17, 1, 3)
    # One process that read nothing holds the point at its first example.
    assert StreamPosition(0, [0, 4], [0, 4], [0, 2]).resume_point() == (0, 4, 2)
    assert StreamPosition(7, [3], [3], [3]).resume_point() == (10, 0, 0)


def test_an_older_config_gets_the_fields_added_since(small_corpus: Path) -> None:
    from transformer_jax import experiment

    config = tiny_train_config(small_corpus)
    for dotted in experiment.LATER_FIELDS:
        section, _, name = dotted.rpartition(".")
        del (config[section] if section else config)[name]
    config.lock()  # as config_flags hands it over
    experiment.validate(config)
    assert config.optim.skip_nonfinite_updates is False
    assert config.optim.max_nonfinite_in_a_row == 10 and config.data.reshard_on_resume is False
    # Older configs decode the test split greedily, keep no best and average nothing, as then.
    assert config.decode.beam_size == 1 and config.train.average_last == 0
    assert config.train.keep_best is False and config.model_from_workdir is False


def _damage(checkpoint: Path) -> None:
    """Truncate every file of a checkpoint's state to a third, as a partial copy leaves them."""
    for path in (checkpoint / "state").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])


@pytest.fixture
def damaged_copy(trained_workdir: Path, tmp_path: Path) -> Path:
    """A copy of the trained workdir (checkpoints 10, 20, 30) whose newest one is damaged."""
    copy = tmp_path / "copy"
    shutil.copytree(trained_workdir, copy)
    _damage(copy / "checkpoints" / "30")
    return copy


def test_load_falls_back_to_the_newest_readable_checkpoint(
    damaged_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="transformer_jax"):
        translator = load(damaged_copy)
    assert translator.step == 20
    assert f"{damaged_copy / 'checkpoints' / '30'}: cannot be read" in caplog.text
    with pytest.raises(UnreadableCheckpointError, match=r"checkpoints/30: cannot be read"):
        load(damaged_copy, step=30)
    assert (damaged_copy / "checkpoints" / "30").is_dir()  # a reader moves nothing
    for step in (10, 20):
        _damage(damaged_copy / "checkpoints" / str(step))
    with pytest.raises(UnreadableCheckpointError, match=r"no readable checkpoint \(step 30: "):
        load(damaged_copy)
    # The commands say so in one line.
    args = ["-m", "transformer_jax.evaluate", "--workdir", str(damaged_copy), "--split", "test"]
    evaluated = run_command([*args, "--method", "greedy"])
    err = evaluated.stderr.decode()
    assert evaluated.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert f"error: {damaged_copy / 'checkpoints'}: no readable checkpoint (step 30: " in err


def test_training_resumes_from_the_newest_readable_checkpoint(
    damaged_copy: Path, small_corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The trained workdir's config (conftest.trained_workdir), run on to step 40.
    config = tiny_train_config(small_corpus)
    config.train.num_steps, config.train.checkpoint_every = 40, 10
    config.train.max_to_keep, config.train.log_every = 5, 10
    config.data.test_split = ""
    with caplog.at_level(logging.INFO, logger="transformer_jax"):
        result = train_and_evaluate(config, damaged_copy)
    assert result.step == 40
    assert "checkpoints/30: cannot be read" in caplog.text
    assert "Restored step 20" in caplog.text
    # Moved aside, not deleted; step 30 was saved again by this run.
    assert (damaged_copy / DAMAGED_CHECKPOINTS / "30" / "state").is_dir()
    assert Workdir(damaged_copy).steps() == [10, 20, 30, 40]
    assert all(np.isfinite(x).all() for x in checkpoint_params(damaged_copy, 30))


def test_a_checkpoint_holding_nan_is_skipped_like_a_damaged_one(
    trained_workdir: Path, small_corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As a run of an older version could leave one: a whole checkpoint of NaN parameters.
    from transformer_jax import experiment, sharding
    from transformer_jax.training.program import build

    copy = tmp_path / "copy"
    shutil.copytree(trained_workdir, copy)
    config = tiny_train_config(small_corpus)
    config.train.num_steps, config.train.checkpoint_every = 40, 10
    config.train.max_to_keep, config.train.log_every = 5, 10
    config.data.test_split = ""
    mesh = sharding.make_mesh(dict(config.mesh.shape))
    program = build(config, experiment.validate(config, jax.devices()), mesh)
    ckpt = Workdir(copy).checkpoints(save_every=0, max_to_keep=10, async_save=False)
    state = ckpt.restore_state(30, program.abstract_state).state
    ckpt.save(40, state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params)), None)
    ckpt.close()
    with caplog.at_level(logging.WARNING, logger="transformer_jax"):
        assert load(copy).step == 30
    assert "checkpoints/40: cannot be read" in caplog.text and "hold NaN/inf" in caplog.text
    config.train.num_steps = 50
    result = train_and_evaluate(config, copy)
    assert result.step == 50 and (copy / DAMAGED_CHECKPOINTS / "40").is_dir()
    assert Workdir(copy).steps() == [10, 20, 30, 40, 50]
    assert all(np.isfinite(x).all() for x in checkpoint_params(copy, 40))


def test_average_skips_an_unreadable_checkpoint(damaged_copy: Path, tmp_path: Path) -> None:
    from transformer_jax.average import main as average_main

    out = tmp_path / "avg"
    assert average_main(["--workdir", str(damaged_copy), "--last", "2", "--output", str(out)]) == 0
    assert (out / Workdir.AVERAGED_FROM).read_text().strip().endswith("steps 10, 20")
    with pytest.raises(SystemExit, match=r"2 readable checkpoint\(s\) \(\[10, 20\] of"):
        average_main(["--workdir", str(damaged_copy), "--last", "3"])


def run_command(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """python ARGS from the repository root, CPU only."""
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


@pytest.mark.slow
def test_translate_names_the_line_that_is_not_utf8(trained_workdir: Path) -> None:
    lines = [b"The doctors can drink the tomato juice.", b"Der M\xfcller", b"Tomorrow we go."]
    stdin = b"\n".join(lines) + b"\n"
    args = ["-m", "transformer_jax.translate", "--workdir", str(trained_workdir), "--method"]
    stopped = run_command([*args, "greedy"], stdin)
    assert stopped.returncode == 1 and stopped.stdout == b""
    err = stopped.stderr.decode()
    assert "error: <stdin>:2: invalid UTF-8 (bytes b'\\xfclle')" in err
    assert "Traceback" not in err
    emptied = run_command([*args, "greedy", "--on_invalid_utf8", "empty"], stdin)
    assert emptied.returncode == 0, emptied.stderr.decode()[-2000:]
    out = emptied.stdout.decode().split("\n")
    assert len(out) == 4 and out[1] == "" and out[0] and out[-1] == ""
    assert "1 line(s) are not valid UTF-8 and were replaced by empty lines (line 2)" in (
        emptied.stderr.decode()
    )


@pytest.mark.slow
def test_train_and_evaluate_name_a_text_file_that_is_not_utf8(
    small_corpus: Path, trained_workdir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "corpus"
    shutil.copytree(small_corpus, bad)
    text = (bad / "train.de").read_bytes().split(b"\n")
    text[4] = b"Gr\xfc\xdfe"
    (bad / "train.de").write_bytes(b"\n".join(text))
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from pathlib import Path\n"
        "from conftest import tiny_train_config\n"
        f"def get_config():\n    return tiny_train_config(Path({str(bad)!r}))\n"
    )
    trained = run_command(["train.py", f"--config={config_file}", f"--workdir={tmp_path / 'w'}"])
    err = trained.stderr.decode()
    assert trained.returncode == 1, err[-3000:]
    assert f"error: {bad / 'train.de'}:5: invalid UTF-8" in err and "Traceback" not in err
    evaluated = run_command(
        [
            "-m",
            "transformer_jax.evaluate",
            "--workdir",
            str(trained_workdir),
            "--source",
            str(bad / "train.de"),
            "--reference",
            str(bad / "train.en"),
        ]
    )
    assert evaluated.returncode == 1
    assert f"error: {bad / 'train.de'}:5: invalid UTF-8" in evaluated.stderr.decode()
    assert "Traceback" not in evaluated.stderr.decode()
