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
    poison.update({3, 4})
    config = tiny_train_config(small_corpus)
    config.data.test_split = ""
    config.optim.skip_nonfinite_updates = True
    config.optim.max_nonfinite_in_a_row = 3
    config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 8, 2, 4
    config.train.max_to_keep = 5
    with caplog.at_level(logging.INFO, logger="transformer_jax"):
        result = train_and_evaluate(config, tmp_path / "run")
    assert result.stopped_by == "finished" and result.step == 8
    assert result.final_metrics["train_skipped_total"] == 2
    assert "skipped_steps=2" in caplog.text and np.isfinite(result.final_metrics["train_loss"])
    # Steps 3 and 4 changed nothing: the parameters saved after step 4 are those of step 2.
    assert Workdir(tmp_path / "run").steps() == [2, 4, 6, 8]
    for a, b in zip(
        checkpoint_params(tmp_path / "run", 2), checkpoint_params(tmp_path / "run", 4), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            checkpoint_params(tmp_path / "run", 4),
            checkpoint_params(tmp_path / "run", 6),
            strict=True,
        )
    )


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
