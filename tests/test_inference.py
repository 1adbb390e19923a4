"""load(), Translator, and the translate / evaluate / average commands on a trained workdir."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_module

import transformer_jax
from transformer_jax import sharding
from transformer_jax.config import ModelConfig
from transformer_jax.inference.translator import Translator, load
from transformer_jax.state import abstract_train_state
from transformer_jax.workdir import Workdir

SENTENCES = [
    "The doctors can drink the tomato juice.",
    "",
    "A friendly student will pick up sixty-nine men.",
    "Tomorrow the teacher buys the red bags.",
]


@pytest.fixture(scope="module")
def translator(trained_workdir: Path) -> Translator:
    return load(trained_workdir)


def test_load_reads_everything_from_the_workdir(trained_workdir: Path) -> None:
    translator = transformer_jax.load(trained_workdir)
    assert translator.step == 30
    assert translator.config == ModelConfig.load(trained_workdir / "model_config.json")
    assert translator.tokenizer.vocab_size <= translator.config.vocab_size
    earlier = transformer_jax.load(trained_workdir, step=10)
    assert earlier.step == 10
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(translator.params), jax.tree.leaves(earlier.params), strict=True
        )
    )


def test_load_errors_name_the_problem(trained_workdir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a transformer-jax workdir"):
        load(tmp_path)
    with pytest.raises(ValueError, match="no checkpoint for step 7"):
        load(trained_workdir, step=7)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_translate_keeps_alignment_and_empty_lines(translator: Translator, method: str) -> None:
    outputs = translator.translate(SENTENCES, method=method, batch_size=2)
    assert len(outputs) == len(SENTENCES)
    assert outputs[1] == ""
    assert all(isinstance(o, str) for o in outputs)
    # Batching must not change results: one at a time gives the same translations.
    assert [translator.translate([s], method=method)[0] for s in SENTENCES] == outputs


def test_beam_one_equals_greedy_through_the_translator(translator: Translator) -> None:
    greedy = translator.translate(SENTENCES, method="greedy")
    assert translator.translate(SENTENCES, method="beam", beam_size=1) == greedy


def test_attention_maps_for_plotting(translator: Translator) -> None:
    maps = translator.attention_weights(SENTENCES[0])
    cfg = translator.config
    s, t = len(maps.source_tokens), len(maps.target_tokens)
    assert maps.cross.shape == (cfg.num_decoder_layers, cfg.num_heads, t, s)
    assert maps.encoder_self.shape == (cfg.num_encoder_layers, cfg.num_heads, s, s)
    assert maps.decoder_self.shape == (cfg.num_decoder_layers, cfg.num_heads, t, t)
    np.testing.assert_allclose(maps.cross.sum(-1), 1.0, atol=1e-5)
    # Causal: no decoder position attends to a later one.
    assert np.allclose(np.triu(maps.decoder_self, k=1), 0.0)
    assert maps.source_tokens[-1] == "</s>"


def test_attention_maps_and_translation_with_scanned_layers(translator: Translator) -> None:
    import dataclasses

    from transformer_jax.model import stack_layer_params

    scanned = dataclasses.replace(
        translator,
        config=translator.config.replace(scan_layers=True),
        params=stack_layer_params(translator.params),
    )
    a, b = translator.attention_weights(SENTENCES[0]), scanned.attention_weights(SENTENCES[0])
    assert a.target_tokens == b.target_tokens
    np.testing.assert_allclose(a.cross, b.cross, atol=1e-5)
    np.testing.assert_allclose(a.encoder_self, b.encoder_self, atol=1e-5)


def test_averaging_two_checkpoints_gives_the_elementwise_mean(
    trained_workdir: Path, tmp_path: Path
) -> None:
    from transformer_jax.average import main as average_main

    out = tmp_path / "avg"
    assert (
        average_main(["--workdir", str(trained_workdir), "--last", "2", "--output", str(out)]) == 0
    )
    config = ModelConfig.load(trained_workdir / "model_config.json")
    mesh = sharding.make_mesh({"data": -1})
    abstract = abstract_train_state(config, mesh, sharding.DEFAULT_RULES).params
    p20, _ = Workdir(trained_workdir).restore_params(20, abstract)
    p30, _ = Workdir(trained_workdir).restore_params(30, abstract)
    averaged = load(out)
    assert averaged.step == 30
    for a, b, m in zip(
        jax.tree.leaves(p20), jax.tree.leaves(p30), jax.tree.leaves(averaged.params), strict=True
    ):
        np.testing.assert_allclose(m, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6, atol=1e-7)
    assert averaged.translate(SENTENCES[:1], method="greedy")[0]
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        average_main(["--workdir", str(trained_workdir), "--last", "2", "--output", str(out)])
    with pytest.raises(SystemExit, match="--last 9"):
        average_main(["--workdir", str(trained_workdir), "--last", "9"])


@pytest.mark.slow
def test_translate_cli_keeps_line_alignment(trained_workdir: Path, translator: Translator) -> None:
    long_line = " ".join(["the red bags"] * 40)
    lines = [SENTENCES[0], "", "", long_line, SENTENCES[2]]
    result = run_module(
        "transformer_jax.translate",
        "--workdir",
        str(trained_workdir),
        "--method",
        "greedy",
        "--max_source_length",
        "32",
        stdin="\n".join(lines) + "\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert out[1] == out[2] == ""
    assert out[0] == translator.translate([SENTENCES[0]], method="greedy")[0]
    assert "truncated" in result.stderr


@pytest.mark.slow
def test_evaluate_cli_prints_json_with_signatures(trained_workdir: Path, tmp_path: Path) -> None:
    hyp = tmp_path / "hyp.txt"
    result = run_module(
        "transformer_jax.evaluate",
        "--workdir",
        str(trained_workdir),
        "--split",
        "validation",
        "--method",
        "greedy",
        "--json",
        "--output",
        str(hyp),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["num_sentences"] == 32
    assert 0 <= report["bleu"] <= 100 and 0 <= report["chrf"] <= 100
    assert report["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "chrF2" in report["chrf_signature"] or "nc:6" in report["chrf_signature"]
    assert len(hyp.read_text().splitlines()) == 32
