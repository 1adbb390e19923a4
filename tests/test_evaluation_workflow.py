"""The paper's reporting in the run: greedy, beam and averaged rows, best checkpoint, early stop."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import checkpoint_params, tiny_train_config

from transformer_jax import experiment
from transformer_jax.training.loop import train_and_evaluate
from transformer_jax.workdir import Workdir


def _config(corpus: Path):
    config = tiny_train_config(corpus)
    config.train.num_steps = 8
    config.train.checkpoint_every = 2
    config.train.max_to_keep = 1  # the rolling checkpoints keep only the newest
    config.train.eval_every = 2
    config.train.eval_bleu_sentences = 8
    config.data.test_split = "test"
    return config


def test_results_hold_greedy_beam_averaged_and_best_rows(
    small_corpus: Path, tmp_path: Path
) -> None:
    config = _config(small_corpus)
    config.decode.beam_size = 2
    config.train.average_last = 3
    config.train.average_every = 2
    config.train.keep_best = True
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir)
    results = json.loads((workdir / "results.json").read_text())
    rows = {(r["name"], r["decoding"]["method"]): r for r in results["rows"]}
    assert list(rows) == [
        ("last", "greedy"),
        ("last", "beam"),
        ("averaged_last3", "beam"),
        ("best", "beam"),
    ]
    assert (
        rows["last", "greedy"]["steps"] == [8] and results["bleu"] == rows["last", "greedy"]["bleu"]
    )
    assert rows["last", "beam"]["decoding"] == {
        "method": "beam",
        "beam_size": 2,
        "alpha": 0.6,
        "extra_length": config.decode.extra_length,
        "max_length": config.decode.max_length,
    }
    assert rows["averaged_last3", "beam"]["steps"] == [4, 6, 8]
    for row in rows.values():
        assert row["signature"].startswith("nrefs:1|") and row["chrf_signature"].startswith(
            "nrefs:1|"
        )
        assert 0 <= row["bleu"] <= 100 and 0 <= row["chrf"] <= 100
        lines = (workdir / row["hypotheses"]).read_text().splitlines()
        assert len(lines) == row["num_sentences"] == 32

    # The average is the mean of exactly steps 4, 6 and 8, though max_to_keep=1 kept only 8.
    assert Workdir(workdir).steps() == [8]
    kept = Workdir(workdir).average_checkpoints
    assert kept.steps() == [4, 6, 8]
    averaged = checkpoint_params(workdir / "averaged_last3", 8)
    mean = [
        np.mean(np.stack(leaves).astype(np.float64), axis=0).astype(leaves[0].dtype)
        for leaves in zip(
            *(checkpoint_params_in(kept.directory, s) for s in (4, 6, 8)), strict=True
        )
    ]
    for a, b in zip(averaged, mean, strict=True):
        np.testing.assert_array_equal(a, b)
    assert "steps 4, 6, 8" in (workdir / "averaged_last3" / "averaged_from.txt").read_text()

    # The best checkpoint is a workdir of its own, never rotated away.
    best = json.loads((workdir / "best" / "best.json").read_text())
    assert best["step"] in (2, 4, 6, 8) and rows["best", "beam"]["steps"] == [best["step"]]
    assert Workdir(workdir / "best").steps() == [best["step"]]


def checkpoint_params_in(directory: Path, step: int) -> list:
    """The parameters of one params-only checkpoint in a folder of them, as numpy leaves."""
    import jax

    from transformer_jax import sharding
    from transformer_jax.state import abstract_train_state
    from transformer_jax.workdir import ParamsCheckpoints

    workdir = Workdir(directory.parent)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    abstract = abstract_train_state(workdir.read_model_config(), mesh, sharding.DEFAULT_RULES)
    params = ParamsCheckpoints(directory).restore(step, abstract.params)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_early_stopping_stops_at_the_expected_evaluation(
    small_corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(small_corpus)
    config.train.num_steps = 40
    config.train.keep_best = True
    config.train.early_stopping_patience = 2
    config.data.test_split = ""
    with caplog.at_level(logging.INFO, logger="transformer_jax"):
        result = train_and_evaluate(config, tmp_path / "run")
    bleus = [float(b) for b in re.findall(r"step \d+ validation: .* BLEU=([\d.]+)", caplog.text)]
    # The rule, replayed on the logged scores: stop at the first evaluation that is the
    # patience-th in a row without beating the best (strictly).
    best, since, expected = None, 0, None
    for i, bleu in enumerate(bleus):
        if best is None or bleu > best:
            best, since = bleu, 0
        else:
            since += 1
        if since == 2:
            expected = (i + 1) * config.train.eval_every
            break
    assert expected is not None, bleus  # (if the model kept improving, nothing would stop)
    assert result.stopped_by == "early_stopped" and result.step == expected
    assert "Early stop: 2 evaluations without" in caplog.text
    # Run again: the count is in the checkpoint, so it stops at once instead of training on.
    again = train_and_evaluate(config, tmp_path / "run")
    assert again.stopped_by == "early_stopped" and again.step == expected


def test_bad_settings_are_refused_by_field(small_corpus: Path) -> None:
    for field, value, message in (
        ("train.average_last", 5, "do not fit in train.num_steps=8"),
        ("train.early_stopping_patience", 2, "needs train.keep_best=True"),
        ("decode.beam_size", 0, "config.decode.beam_size"),
    ):
        config = _config(small_corpus)
        config.train.average_every = 2
        section, _, name = field.rpartition(".")
        config[section][name] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            experiment.validate(config)
