"""Decoder properties: cache vs full forward, beam scores, caps, sampling, length penalty."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.config import BOS_ID, EOS_ID, PAD_ID, ModelConfig
from transformer_jax.inference import decode as decode_module
from transformer_jax.inference.decode import (
    BeamState,
    beam_search,
    greedy_decode,
    length_penalty,
    output_limits,
    sample_decode,
)
from transformer_jax.model import Transformer, stack_layer_params

# Untied output projection: with tied embeddings random params mostly echo the input token.
CONFIG = ModelConfig.preset(
    "tiny",
    vocab_size=40,
    d_model=32,
    num_heads=2,
    d_ff=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
    max_len=64,
    embedding_sharing="none",
)
MAX_LENGTH = 24
EXTRA_LENGTH = 10


@pytest.fixture(scope="module")
def setup() -> tuple[Transformer, dict, np.ndarray]:
    """A random model whose outputs mix early EOS and capped sentences, and a padded batch."""
    rng = np.random.default_rng(0)
    src = rng.integers(4, CONFIG.vocab_size, (8, 8)).astype(np.int32)
    src[1, 5:] = PAD_ID
    src[3, 2:] = PAD_ID
    model = Transformer(CONFIG)
    params = nn.unbox(model.init(jax.random.key(0), src, src)["params"])
    # A little noise on every weight: the initial LayerNorm/bias values make outputs too uniform.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return model, jax.tree.unflatten(treedef, noisy), src


def output_lengths(out_BxT: np.ndarray) -> np.ndarray:
    """Tokens up to and including the first EOS (every decoder output must have one)."""
    is_eos_BxT = out_BxT == EOS_ID
    assert is_eos_BxT.any(axis=1).all(), out_BxT
    return is_eos_BxT.argmax(axis=1) + 1


def normalized_scores(
    model: Transformer, params: dict, src: np.ndarray, out_BxT: np.ndarray, alpha: float
) -> np.ndarray:
    """sum_t log P(y_t | y_<t, x) from a teacher-forced pass, divided by lp(|Y|)."""
    logits_BxTxV = model.apply({"params": params}, src, out_BxT)
    logp_BxT = np.take_along_axis(
        np.asarray(jax.nn.log_softmax(logits_BxTxV)), out_BxT[:, :, None], axis=-1
    )[:, :, 0]
    lengths_B = output_lengths(out_BxT)
    in_output_BxT = np.arange(out_BxT.shape[1]) < lengths_B[:, None]
    total_B = np.where(in_output_BxT, logp_BxT, 0.0).sum(axis=1)
    return total_B / np.asarray(length_penalty(lengths_B, alpha))


def jit_greedy(model: Transformer, **kwargs: int) -> jax.stages.Wrapped:
    options = {"max_length": MAX_LENGTH, "extra_length": EXTRA_LENGTH, **kwargs}
    return jax.jit(functools.partial(greedy_decode, model, **options))


def jit_beam(model: Transformer, beam_size: int, alpha: float, **kwargs: int) -> jax.stages.Wrapped:
    options = {"max_length": MAX_LENGTH, "extra_length": EXTRA_LENGTH, **kwargs}
    return jax.jit(
        functools.partial(beam_search, model, beam_size=beam_size, alpha=alpha, **options)
    )


def test_length_penalty_follows_the_gnmt_formula() -> None:
    lengths = np.array([1, 5, 20])
    np.testing.assert_allclose(length_penalty(lengths, 0.6), ((5 + lengths) / 6) ** 0.6, rtol=1e-6)
    np.testing.assert_allclose(length_penalty(lengths, 0.6), [1.0, 1.358655, 2.354362], rtol=1e-5)
    np.testing.assert_array_equal(length_penalty(lengths, 0.0), [1.0, 1.0, 1.0])
    # Ranking: log-prob -6 over 10 tokens beats -5 over 4 tokens at alpha 0.6, not at alpha 0.
    long, short = (-6.0, 10), (-5.0, 4)
    for alpha, long_wins in ((0.6, True), (0.0, False)):
        long_score = long[0] / float(length_penalty(long[1], alpha))
        short_score = short[0] / float(length_penalty(short[1], alpha))
        assert (long_score > short_score) == long_wins


def test_greedy_equals_argmax_of_teacher_forced_forward(setup: tuple) -> None:
    model, params, src = setup
    out = np.asarray(jit_greedy(model)(params, src))
    logits_BxTxV = np.array(model.apply({"params": params}, src, out))
    # The decoders never emit PAD or BOS, and emit EOS at the cap whatever the logits say.
    logits_BxTxV[:, :, [PAD_ID, BOS_ID]] = -np.inf
    expected_BxT = logits_BxTxV.argmax(axis=-1)
    lengths = output_lengths(out)
    limits = np.asarray(output_limits(src, EXTRA_LENGTH, MAX_LENGTH))
    assert (lengths < limits).any() and (lengths == limits).any(), "fixture must mix both"
    for row, (n, cap) in enumerate(zip(lengths, limits, strict=True)):
        assert n <= cap
        if n == cap:
            expected_BxT[row, n - 1] = EOS_ID
        np.testing.assert_array_equal(out[row, :n], expected_BxT[row, :n], err_msg=f"row {row}")
        assert (out[row, n:] == PAD_ID).all()


def test_beam_one_equals_greedy(setup: tuple) -> None:
    model, params, src = setup
    # With EOS blocked until each sentence's cap, the single beam is the argmax path.
    forced = {"min_length": MAX_LENGTH}
    greedy = np.asarray(jit_greedy(model, **forced)(params, src))
    beam, _ = jit_beam(model, beam_size=1, alpha=0.6, **forced)(params, src)
    np.testing.assert_array_equal(np.asarray(beam), greedy)


def test_beam_one_returns_a_greedy_prefix_at_least_as_good(setup: tuple) -> None:
    model, params, src = setup
    alpha = 0.0
    greedy = np.asarray(jit_greedy(model)(params, src))
    beam, score = jit_beam(model, beam_size=1, alpha=alpha)(params, src)
    beam = np.asarray(beam)
    # Each step also scores "alive + EOS" (2W candidates), so one beam may finish at a prefix of
    # the greedy path that is more probable than greedy's own ending; otherwise it is greedy.
    n_beam, n_greedy = output_lengths(beam), output_lengths(greedy)
    assert (n_beam <= n_greedy).all()
    for row, n in enumerate(n_beam):
        np.testing.assert_array_equal(beam[row, : n - 1], greedy[row, : n - 1])
    assert (np.asarray(score) >= normalized_scores(model, params, src, greedy, alpha) - 1e-4).all()
    assert (beam == greedy).all(axis=1).sum() >= len(src) // 2


def reference_beam_search(
    model: Transformer,
    params: dict,
    src: np.ndarray,
    beam_size: int,
    alpha: float,
    settled: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The same search in plain Python over hypothesis lists, with full forward passes, no cache.

    A sentence is done when its bound cannot beat its `settled`-th best finished score (None:
    the worst of beam_size, tensor2tensor's rule). Returns (best, scores, decoder steps run).
    """
    settled = settled or beam_size
    forward = jax.jit(lambda p, s, t: jax.nn.log_softmax(model.apply({"params": p}, s, t)))
    B, V = src.shape[0], CONFIG.vocab_size
    caps = np.minimum((src != PAD_ID).sum(axis=1) + EXTRA_LENGTH, MAX_LENGTH)
    alive: list[list[tuple[float, tuple[int, ...]]]] = [[(0.0, ())] for _ in range(B)]
    finished: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(B)]
    done = [False] * B
    src_rep = np.repeat(src, beam_size, axis=0)
    steps = MAX_LENGTH
    for i in range(MAX_LENGTH):
        # Any non-PAD filler after the prefix: position i only sees targets before it.
        tgt = np.full((B * beam_size, MAX_LENGTH), 4, np.int32)
        for b in range(B):
            for w, (_, seq) in enumerate([] if done[b] else alive[b]):
                tgt[b * beam_size + w, :i] = seq
        logp = np.asarray(forward(params, src_rep, tgt))[:, i]
        for b in range(B):
            if done[b]:
                continue
            allowed = [v for v in range(V) if v not in (PAD_ID, BOS_ID)]
            if i + 1 >= caps[b]:
                allowed = [EOS_ID]
            candidates = sorted(
                (
                    (score + float(logp[b * beam_size + w, v]), (*seq, v))
                    for w, (score, seq) in enumerate(alive[b])
                    for v in allowed
                ),
                reverse=True,
            )[: 2 * beam_size]
            alive[b] = [c for c in candidates if c[1][-1] != EOS_ID][:beam_size]
            ended = [
                (s / float(length_penalty(i + 1, alpha)), q)
                for s, q in candidates
                if q[-1] == EOS_ID
            ]
            finished[b] = sorted(finished[b] + ended, reverse=True)[:beam_size]
            bound = alive[b][0][0] / float(length_penalty(caps[b], alpha)) if alive[b] else -np.inf
            done[b] = len(finished[b]) >= settled and bound <= finished[b][settled - 1][0]
        if all(done):
            steps = i + 1
            break
    out = np.full((B, MAX_LENGTH), PAD_ID, np.int32)
    for b in range(B):
        out[b, : len(finished[b][0][1])] = finished[b][0][1]
    return out, np.array([f[0][0] for f in finished], np.float32), steps


def test_beam_search_matches_a_plain_python_reference(setup: tuple) -> None:
    model, params, src = setup
    expected, expected_score, _ = reference_beam_search(model, params, src, beam_size=4, alpha=0.6)
    beam, score = jit_beam(model, beam_size=4, alpha=0.6)(params, src)
    np.testing.assert_array_equal(np.asarray(beam), expected)
    np.testing.assert_allclose(np.asarray(score), expected_score, rtol=1e-4)


def test_beam_search_stops_once_the_returned_hypothesis_is_settled(
    setup: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, params, src = setup
    src = src[[3, 5, 6]]  # sentences that end before their cap (the cap ends the others)
    expected, expected_score, t2t_steps = reference_beam_search(model, params, src, 4, 0.6)
    settled, settled_score, settled_steps = reference_beam_search(model, params, src, 4, 0.6, 1)
    # Stopping once the best cannot change gives tensor2tensor's result, in fewer steps.
    np.testing.assert_array_equal(settled, expected)
    np.testing.assert_array_equal(settled_score, expected_score)
    assert settled_steps < t2t_steps, (settled_steps, t2t_steps)

    steps_run: list[int] = []
    finish = decode_module._best_hypotheses

    def counting(state: BeamState, count: int, alpha: float) -> tuple:
        jax.debug.callback(lambda step: steps_run.append(int(step)), state.step)
        return finish(state, count, alpha)

    monkeypatch.setattr(decode_module, "_best_hypotheses", counting)
    beam, score = jit_beam(model, beam_size=4, alpha=0.6)(params, src)
    np.testing.assert_array_equal(np.asarray(beam), expected)
    np.testing.assert_allclose(np.asarray(score), expected_score, rtol=1e-4)
    assert steps_run == [settled_steps]


def test_beam_score_is_teacher_forced_log_prob_over_length_penalty(setup: tuple) -> None:
    model, params, src = setup
    alpha = 0.6
    beam, score = jit_beam(model, beam_size=4, alpha=alpha)(params, src)
    beam, score = np.asarray(beam), np.asarray(score)
    assert score.dtype == np.float32 and beam.dtype == np.int32
    np.testing.assert_allclose(score, normalized_scores(model, params, src, beam, alpha), rtol=1e-4)
    # Beam search may prune the greedy path (here in 1 row of 8), so no per-row guarantee; on
    # average, and in most rows, it finds a better hypothesis under its own objective.
    greedy = np.asarray(jit_greedy(model)(params, src))
    greedy_score = normalized_scores(model, params, src, greedy, alpha)
    assert score.mean() > greedy_score.mean()
    assert (score >= greedy_score - 1e-4).sum() >= 0.75 * len(src), (score, greedy_score)


@pytest.mark.parametrize("decoder", ["greedy", "beam", "sample"])
def test_outputs_respect_the_per_sentence_cap(setup: tuple, decoder: str) -> None:
    model, params, src = setup
    extra = 3
    options = {"max_length": MAX_LENGTH, "extra_length": extra}
    if decoder == "greedy":
        # min_length beyond every cap: no sentence may end before its cap.
        out = jax.jit(functools.partial(greedy_decode, model, min_length=MAX_LENGTH, **options))(
            params, src
        )
    elif decoder == "beam":
        out, _ = jax.jit(functools.partial(beam_search, model, **options))(params, src)
    else:
        out = jax.jit(functools.partial(sample_decode, model, **options))(
            params, src, jax.random.key(0)
        )
    out = np.asarray(out)
    limits = (src != PAD_ID).sum(axis=1) + extra
    lengths = output_lengths(out)
    assert (lengths <= limits).all(), (lengths, limits)
    if decoder == "greedy":
        np.testing.assert_array_equal(lengths, limits)
    for row, n in enumerate(lengths):
        assert (out[row, n:] == PAD_ID).all(), out[row]
        assert not np.isin(out[row, : n - 1], [PAD_ID, BOS_ID, EOS_ID]).any(), out[row]


def test_sample_decode_top_k_one_is_greedy_and_rng_decides(setup: tuple) -> None:
    model, params, src = setup
    greedy = np.asarray(jit_greedy(model)(params, src))
    options = {"max_length": MAX_LENGTH, "extra_length": EXTRA_LENGTH}
    top1 = jax.jit(functools.partial(sample_decode, model, top_k=1, **options))
    np.testing.assert_array_equal(np.asarray(top1(params, src, jax.random.key(7))), greedy)
    sample = jax.jit(functools.partial(sample_decode, model, temperature=1.0, **options))
    first = np.asarray(sample(params, src, jax.random.key(1)))
    np.testing.assert_array_equal(np.asarray(sample(params, src, jax.random.key(1))), first)
    assert (np.asarray(sample(params, src, jax.random.key(2))) != first).any()


def test_sample_decode_temperature_zero_is_greedy(setup: tuple) -> None:
    model, params, src = setup
    greedy = np.asarray(jit_greedy(model)(params, src))
    options = {"max_length": MAX_LENGTH, "extra_length": EXTRA_LENGTH}
    cold = jax.jit(functools.partial(sample_decode, model, temperature=0.0, **options))
    np.testing.assert_array_equal(np.asarray(cold(params, src, jax.random.key(3))), greedy)


MESH_SCRIPT = textwrap.dedent(
    """
    import functools
    import flax.linen as nn, jax, numpy as np
    from transformer_jax.config import ModelConfig
    from transformer_jax.inference.decode import beam_search, greedy_decode, sample_decode
    from transformer_jax.model import Transformer
    from transformer_jax import sharding

    cfg = ModelConfig.preset("tiny", vocab_size=40, d_model=32, num_heads=2, d_ff=64,
                             num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                             max_len=64, embedding_sharing="none")
    model = Transformer(cfg)
    src = np.random.default_rng(0).integers(4, 40, (8, 8)).astype(np.int32)
    src[1, 5:] = 0
    options = {"max_length": 20, "extra_length": 8}
    decoders = {
        "beam": functools.partial(beam_search, model, **options),
        "greedy": functools.partial(greedy_decode, model, **options),
        "sample": lambda p, x: sample_decode(model, p, x, jax.random.key(5), **options),
    }
    results = {}
    for name, shape, devices in [("single", {"data": 1}, jax.devices()[:1]),
                                 ("data2_tensor2", {"data": 2, "tensor": 2}, None)]:
        mesh = sharding.make_mesh(shape, devices)
        rules = sharding.DEFAULT_RULES
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            variables, shardings = sharding.sharded_init(
                lambda: model.init(jax.random.key(0), src[:1], src[:1]), mesh, rules)
            data = sharding.batch_sharding(mesh)
            x = jax.make_array_from_process_local_data(data, src)
            for decoder, fn in decoders.items():
                out = (data, data) if decoder == "beam" else data
                f = jax.jit(fn, in_shardings=(shardings["params"], data), out_shardings=out)
                results[name, decoder] = jax.device_get(f(variables["params"], x))
    for decoder in decoders:
        for a, b in zip(jax.tree.leaves(results["single", decoder]),
                        jax.tree.leaves(results["data2_tensor2", decoder])):
            np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=decoder)
    print("MESH-OK")
    """
)


def test_decoders_under_a_sharded_mesh_equal_single_device() -> None:
    # Fake CPU devices must be set before jax starts, hence a fresh interpreter.
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "MESH-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_decoders_with_scanned_layers_match_the_layer_loop(setup: tuple) -> None:
    _, _, src = setup
    config = CONFIG.replace(num_encoder_layers=2, num_decoder_layers=2)
    model = Transformer(config)
    params = nn.unbox(model.init(jax.random.key(2), src, src)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )
    scanned = Transformer(config.replace(scan_layers=True))
    stacked = stack_layer_params(params)
    # The beam cache reorder must gather along the batch axis behind the scanned layer axis.
    out, score = jit_beam(model, 4, 0.6)(params, src)
    out_scanned, score_scanned = jit_beam(scanned, 4, 0.6)(stacked, src)
    np.testing.assert_array_equal(out, out_scanned)
    np.testing.assert_allclose(score, score_scanned, atol=1e-5)
    np.testing.assert_array_equal(jit_greedy(model)(params, src), jit_greedy(scanned)(stacked, src))


def test_a_growing_cache_decodes_as_one_full_buffer(
    setup: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformer_jax.model import cache as model_cache

    model, params, src = setup
    options = {"max_length": MAX_LENGTH, "extra_length": EXTRA_LENGTH}
    decoders = {
        "greedy": lambda: greedy_decode(model, params, src, return_scores=True, **options),
        "beam": lambda: beam_search(model, params, src, num_hypotheses=3, **options),
        "sample": lambda: sample_decode(model, params, src, jax.random.key(4), **options),
    }
    results = {}
    for first in (4, 1000):  # caches of 4 -> 8 -> 24 slots, or 24 from the start
        monkeypatch.setattr(model_cache, "FIRST_CAPACITY", first)
        assert len(model_cache.capacities(MAX_LENGTH)) == (3 if first == 4 else 1)
        results[first] = {name: jax.jit(fn)() for name, fn in decoders.items()}
    for name in decoders:
        for grown, whole in zip(
            jax.tree.leaves(results[4][name]), jax.tree.leaves(results[1000][name]), strict=True
        ):
            if np.asarray(grown).dtype == np.int32:
                np.testing.assert_array_equal(grown, whole, err_msg=name)
            else:
                np.testing.assert_allclose(grown, whole, rtol=1e-5, err_msg=name)
    # Some sentence of the fixture outlives the first two capacities.
    assert output_lengths(np.asarray(results[4]["greedy"][0])).max() > 8


@pytest.mark.parametrize(("V", "k"), [(37000, 8), (37000, 2), (5000, 8), (4097, 8)])
def test_top_k_rows_equals_lax_top_k(V: int, k: int) -> None:
    """Beam search's blocked top-k: the same values and columns, ties and -inf included."""
    from transformer_jax.inference.decode import top_k_rows

    rng = np.random.default_rng(V + k)
    x = jnp.asarray(rng.normal(size=(6, V)), jnp.float32)
    x = x.at[:, ::7].set(-jnp.inf).at[2].set(jnp.round(x[2]))  # masked columns, many ties
    x = x.at[4].set(-jnp.inf).at[4, 5].set(0.0)  # a row with one finite entry
    expected_values, expected_columns = jax.lax.top_k(x, k)
    values, columns = jax.jit(top_k_rows, static_argnums=1)(x, k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(columns, expected_columns)
