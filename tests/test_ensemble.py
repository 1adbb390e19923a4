"""Ensembles: several checkpoints or runs decoded as one (mean log-probabilities per step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import evaluate, load
from transformer_jax.config import BOS_ID, EOS_ID, PAD_ID
from transformer_jax.data.tokenizer import train_tokenizer
from transformer_jax.inference.decode import beam_search, greedy_decode, length_penalty
from transformer_jax.model import Ensemble, check_members, stack_layer_params
from transformer_jax.workdir import Workdir

SOURCES = [
    "The teacher buys twenty-one red bags.",
    "Did a friendly sister pick up thirty teachers in the supermarket?",
    "The doctors can drink the tomato juice.",
    "In the park the friends have invited the young baker.",
]
MAX_LENGTH = 12


def _src(translator) -> jax.Array:
    rows = [[*translator.tokenizer.encode(s), EOS_ID] for s in SOURCES]
    out = np.full((len(rows), max(map(len, rows))), PAD_ID, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return jnp.asarray(out)


def _greedy(model, params, src):
    return greedy_decode(
        model, params, src, max_length=MAX_LENGTH, extra_length=1000, return_scores=True
    )


def test_a_model_ensembled_with_itself_decodes_as_it_does_alone(trained_workdir: Path) -> None:
    alone = load(trained_workdir)
    twice = load([trained_workdir, trained_workdir])
    assert twice.members == ((str(trained_workdir), 30), (str(trained_workdir), 30))
    src = _src(alone)
    tokens, scores = _greedy(alone.model, alone.params, src)
    tokens2, scores2 = _greedy(twice.model, twice.params, src)
    np.testing.assert_array_equal(tokens, tokens2)
    np.testing.assert_allclose(scores, scores2, atol=1e-5)
    beam = beam_search(alone.model, alone.params, src, beam_size=3, max_length=MAX_LENGTH)
    beam2 = beam_search(twice.model, twice.params, src, beam_size=3, max_length=MAX_LENGTH)
    np.testing.assert_array_equal(beam[0], beam2[0])
    np.testing.assert_allclose(beam[1], beam2[1], atol=1e-5)
    # Through the translator too (batching, line alignment, n-best scores).
    one = alone.translate_nbest(SOURCES, nbest=2, beam_size=3)
    two = twice.translate_nbest(SOURCES, nbest=2, beam_size=3)
    assert [[t for t, _ in h] for h in one] == [[t for t, _ in h] for h in two]
    np.testing.assert_allclose(
        [s for h in one for _, s in h], [s for h in two for _, s in h], atol=1e-5
    )


def _reference_greedy(members, src: np.ndarray) -> tuple[list[list[int]], list[float]]:
    """Plain Python: per step, each member's full forward pass on the prefix; mean log-probs."""
    outputs, scores = [], []
    # One compiled full forward pass per member, over a fixed-length target.
    forwards = [jax.jit(t.model.apply) for t in members]
    for row in src:
        row = row[None]
        tokens: list[int] = []
        logp = 0.0
        limit = min(int((row != PAD_ID).sum()) + 1000, MAX_LENGTH)
        while True:
            # Slots from len(tokens) on are never read at position len(tokens) (inputs are
            # shifted right, attention is causal) but must not be PAD: validity follows them.
            prefix = np.full((1, MAX_LENGTH), EOS_ID, np.int32)
            prefix[0, : len(tokens)] = tokens
            per_member = []
            for translator, forward in zip(members, forwards, strict=True):
                logits = forward({"params": translator.params}, row, prefix)
                per_member.append(jax.nn.log_softmax(logits[0, len(tokens)]))
            mean = jnp.mean(jnp.stack(per_member), axis=0)
            dist = np.asarray(jax.nn.log_softmax(mean), np.float64)
            allowed = dist.copy()
            allowed[[PAD_ID, BOS_ID]] = -np.inf
            token = EOS_ID if len(tokens) + 1 >= limit else int(np.argmax(allowed))
            logp += dist[token]
            tokens.append(token)
            if token == EOS_ID:
                break
        outputs.append(tokens)
        scores.append(logp / float(length_penalty(len(tokens), 0.6)))
    return outputs, scores


def test_an_ensemble_of_two_checkpoints_is_the_mean_of_their_log_probs(
    trained_workdir: Path,
) -> None:
    a, b = load(trained_workdir, 10), load(trained_workdir, 30)
    both = load(trained_workdir, step=[10, 30])
    assert isinstance(both.model, Ensemble) and both.members[1] == (str(trained_workdir), 30)
    src = _src(a)
    tokens, scores = (np.asarray(x) for x in _greedy(both.model, both.params, src))
    expected, expected_scores = _reference_greedy([a, b], np.asarray(src))
    got = [list(r[: list(r).index(EOS_ID) + 1]) for r in tokens]
    assert got == expected
    np.testing.assert_allclose(scores, expected_scores, atol=1e-4)
    # And it is neither of the two.
    for member in (a, b):
        alone = np.asarray(_greedy(member.model, member.params, src)[0])
        assert not np.array_equal(alone, tokens) or not np.allclose(
            np.asarray(_greedy(member.model, member.params, src)[1]), scores, atol=1e-3
        )


def test_scanned_and_unscanned_members_decode_together(
    trained_workdir: Path, tmp_path: Path
) -> None:
    scanned = tmp_path / "scanned"
    source = Workdir(trained_workdir)
    source.copy_metadata_to(Workdir(scanned))
    (scanned / "model_config.json").unlink()
    b = load(trained_workdir, 10)
    Workdir(scanned).write_model_config(b.config.replace(scan_layers=True))
    Workdir(scanned).save_params(10, stack_layer_params(b.params))
    plain = load([trained_workdir, trained_workdir], step=[30, 10])
    mixed = load([trained_workdir, scanned], step=[30, 10])
    src = _src(plain)
    want = beam_search(plain.model, plain.params, src, beam_size=3, max_length=MAX_LENGTH)
    got = beam_search(mixed.model, mixed.params, src, beam_size=3, max_length=MAX_LENGTH)
    np.testing.assert_array_equal(want[0], got[0])
    np.testing.assert_allclose(want[1], got[1], atol=1e-5)


def test_mismatched_tokenizers_and_vocabularies_are_refused(
    trained_workdir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(trained_workdir, other)
    sentences = [f"word{i} thing{i % 7} other{i % 13}" for i in range(500)]
    tok = train_tokenizer(sentences, tmp_path / "tok", vocab_size=200)
    shutil.copy(tok.path, other / "tokenizer.model")
    with pytest.raises(ValueError, match=r"its tokenizer differs from .*an ensemble needs"):
        load([trained_workdir, other])
    config = load(trained_workdir).config
    with pytest.raises(ValueError, match=r"ensemble member 1: ModelConfig.vocab_size=512"):
        check_members([config, config.replace(vocab_size=512)])
    with pytest.raises(ValueError, match="one step per workdir"):
        load([trained_workdir, trained_workdir], step=[10, 20, 30])


def test_evaluate_decodes_an_ensemble(trained_workdir: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--workdir", str(trained_workdir), "--step", "10", "30", "--method", "greedy"]
    assert evaluate.main([*argv, "--limit", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ensemble"] == [
        {"workdir": str(trained_workdir), "step": 10},
        {"workdir": str(trained_workdir), "step": 30},
    ]
    assert result["hypotheses"].endswith("test.ensemble2.step10.hyp.txt")
    assert result["num_sentences"] == 4
