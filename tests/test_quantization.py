"""int8 decoding: the int8 products, the quantized parameters, the int8 KV cache, load and flags."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_module

from transformer_jax.config import ModelConfig
from transformer_jax.model import Ensemble, Transformer, init_cache
from transformer_jax.model.cache import bytes_per_token
from transformer_jax.model.quant import Int8Array, product, quantize_params, quantize_rows

SMALL = {
    "vocab_size": 64,
    "d_model": 32,
    "num_heads": 4,
    "d_ff": 64,
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
    "max_len": 32,
    "dropout_rate": 0.0,
}


def _init(config: ModelConfig, seed: int = 0) -> dict:
    src = jnp.ones((1, 4), jnp.int32)
    return nn.unbox(jax.jit(Transformer(config).init)(jax.random.key(seed), src, src)["params"])


def _int8(config: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    int8_config = config.replace(quantization="int8")
    src = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(Transformer(int8_config).init, jax.random.key(0), src, src)
    return int8_config, quantize_params(params, shapes["params"])


@pytest.mark.parametrize(
    ("spec", "x_shape", "w_shape", "contract"),
    [
        ("BLD,DNK->BLNK", (2, 3, 16), (16, 4, 8), (0,)),  # query/key/value projections
        ("BTHK,HKD->BTD", (2, 3, 4, 8), (4, 8, 16), (0, 1)),  # output projection
        ("BTD,VD->BTV", (2, 3, 16), (40, 16), (1,)),  # pre-softmax with the embedding table
        ("EBCD,EDF->EBCF", (3, 2, 5, 16), (3, 16, 24), (1,)),  # experts
    ],
)
def test_int8_product_is_the_dequantized_product(
    spec: str, x_shape: tuple, w_shape: tuple, contract: tuple
) -> None:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape)
    w_q, w_scale = quantize_rows(w, contract)
    assert w_q.dtype == jnp.int8 and w_scale.ndim == w.ndim
    got = product(spec, x, Int8Array(w_q, w_scale), jnp.float32)
    # The same numbers through float math: int8 sums are exact, so only rounding differs.
    x_letters, rest = spec.split(",")
    w_letters, out = rest.split("->")
    x_axes = [i for i, c in enumerate(x_letters) if c in w_letters and c not in out]
    x_q, x_scale = quantize_rows(x, x_axes)
    expected = jnp.einsum(spec, x_q * x_scale, w_q * w_scale)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # And close to the float product: within 5% of its mean magnitude.
    exact = jnp.einsum(spec, x, w)
    assert float(jnp.abs(got - exact).max()) < 0.05 * float(jnp.abs(exact).mean()) + 0.1
    assert got.shape == exact.shape


def test_quantize_rows_clips_and_keeps_zero_rows() -> None:
    x = jnp.asarray([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    values, scale = quantize_rows(x, [1])
    assert values.dtype == jnp.int8
    assert values[0].tolist() == [0, 0, 0] and float(scale[0, 0]) == 1.0
    assert values[1].tolist() == [64, -127, 32]
    np.testing.assert_allclose(values[1] * scale[1], x[1], atol=float(scale[1, 0]) / 2)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"feed_forward": "swiglu", "embedding_sharing": "none", "scan_layers": True},
        {"moe_num_experts": 4, "moe_encoder_every": 1, "num_kv_heads": 1},
    ],
    ids=["paper", "swiglu_unshared_scanned", "moe_mqa"],
)
def test_quantize_params_makes_every_matrix_int8(variant: dict) -> None:
    config = ModelConfig(**SMALL, **variant)
    params = _init(config)
    _, int8_params = _int8(config, params)
    flat = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(int8_params)[0]
    }
    floats = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    int8 = {name for name, leaf in flat.items() if leaf.dtype == jnp.int8}
    matrices = {
        name
        for name, leaf in floats.items()
        if name.rsplit("/", 1)[-1] in ("kernel", "embedding", "wi", "wo", "wi_gate")
    }
    assert int8 == matrices and int8  # every matrix, nothing else (norms, biases, router)
    for name in int8:
        w, w_q, scale = floats[name], flat[name], flat[name + "_scale"]
        assert scale.dtype == jnp.float32 and scale.ndim == w.ndim
        # Symmetric rounding: each entry within half a step of its channel's scale.
        assert bool(jnp.all(jnp.abs(w_q * scale - w) <= scale / 2 + 1e-7)), name
        assert int(jnp.abs(w_q).max()) == 127
    assert any("router" in name and flat[name].dtype == jnp.float32 for name in flat) == bool(
        variant.get("moe_num_experts")
    )


def test_int8_teacher_forced_logprobs_on_random_base_weights() -> None:
    """The paper's base shape, random weights: int8 log-probs within a stated tolerance.

    Tolerance (docs/inference.md): mean |log p_int8 - log p_fp32| of the reference tokens
    below 0.03 and the worst below 0.15, and the arg max agreeing on at least 95% of positions.
    """
    config = ModelConfig.preset("base").replace(dropout_rate=0.0)
    params = _init(config)
    int8_config, int8_params = _int8(config, params)
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(4, config.vocab_size, (4, 24)), jnp.int32)
    tgt = jnp.asarray(rng.integers(4, config.vocab_size, (4, 20)), jnp.int32)

    def logp(model_config: ModelConfig, p: dict) -> jax.Array:
        return jax.jit(
            lambda p: jax.nn.log_softmax(Transformer(model_config).apply({"params": p}, src, tgt))
        )(p)

    a, b = logp(config, params), logp(int8_config, int8_params)
    chosen_a = jnp.take_along_axis(a, tgt[..., None], -1)
    chosen_b = jnp.take_along_axis(b, tgt[..., None], -1)
    error = jnp.abs(chosen_a - chosen_b)
    # Measured on one machine: mean 0.017, worst 0.059, arg max agreeing everywhere.
    assert float(error.mean()) < 0.03 and float(error.max()) < 0.15, (error.mean(), error.max())
    agree = float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1)))
    assert agree >= 0.95, agree


@pytest.mark.parametrize(
    "variant",
    [{}, {"num_kv_heads": 2, "dtype": "bfloat16"}, {"scan_layers": True}],
    ids=["float32", "gqa_bfloat16", "scanned"],
)
def test_kv_cache_bytes_per_token_follow_the_formula(variant: dict) -> None:
    config = ModelConfig(**SMALL, **variant)
    params = _init(config)
    rows, sources, capacity = 6, 3, 16
    src = jnp.ones((sources, 5), jnp.int32)
    measured = {}
    for kv_cache in ("float", "int8"):
        model = Transformer(config.replace(kv_cache=kv_cache))
        encoded = model.apply({"params": params}, src, method="encode")
        cache = init_cache(model, params, encoded, src, capacity, copies=rows // sources)
        self_bytes = sum(
            leaf.size * leaf.dtype.itemsize
            for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]
            if str(path[-1].key).startswith("cached_")
        )
        measured[kv_cache] = self_bytes / (rows * capacity)
        assert measured[kv_cache] == bytes_per_token(config.replace(kv_cache=kv_cache))
    K, G, layers = config.head_dim, config.kv_heads, config.num_decoder_layers
    assert measured["int8"] == 2 * layers * G * (K + 4)
    bf16 = bytes_per_token(config.replace(dtype="bfloat16"))
    f32 = bytes_per_token(config.replace(dtype="float32"))
    assert (bf16, f32) == (2 * layers * G * K * 2, 2 * layers * G * K * 4)
    # int8 values: half of bfloat16's and a quarter of float32's, plus a 4-byte scale per vector.
    assert measured["int8"] * 2 * K == bf16 * (K + 4)


def _test_split(workdir: Path) -> tuple[list[str], list[str]]:
    import json

    config = json.loads((workdir / "config.json").read_text())
    corpus = Path(config["data"]["options"]["source_path"]).parent
    return (
        (corpus / "test.en").read_text().splitlines(),
        (corpus / "test.de").read_text().splitlines(),
    )


@pytest.fixture(scope="module")
def fluent_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that translates (test BLEU about 35 here), unlike trained_workdir's 30 steps.

    A 1+1-layer, 128-wide model trained 600 steps on 8,000 built-in pairs (about 45 s on 2
    cores); int8 is compared on its 64-sentence test split.
    """
    from conftest import tiny_train_config

    from transformer_jax.data.corpus import CorpusSizes, write_builtin_corpus
    from transformer_jax.training.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("fluent")
    write_builtin_corpus(
        root / "corpus", seed=0, sizes=CorpusSizes(train=8000, validation=32, test=64)
    )
    config = tiny_train_config(root / "corpus")
    config.model.d_model, config.model.d_ff, config.model.num_heads = 128, 256, 4
    config.model.vocab_size = config.data.tokenizer.vocab_size = 512
    config.data.tokens_per_batch = 1024
    config.optim.warmup_steps = 100
    config.train.num_steps = config.train.checkpoint_every = 600
    config.train.log_every = 200
    config.data.test_split = ""
    train_and_evaluate(config, root / "workdir")
    return root / "workdir"


def test_int8_decoding_keeps_the_translations(fluent_workdir: Path, tmp_path: Path) -> None:
    """int8 changes what CTranslate2's int8 changes (the same scheme), and int8 KV nearly nothing.

    On the default workdir's 1,000 test sentences the BLEU figures are docs/inference.md's
    (within 0.1 of float32). This smaller model is less sure of itself: int8 flips about one
    greedy translation in six here, and CTranslate2 int8 flips the same ones.
    """
    ctranslate2 = pytest.importorskip("ctranslate2")
    del ctranslate2
    from transformer_jax import evaluation, load
    from transformer_jax.export import export_ctranslate2

    sources, references = _test_split(fluent_workdir)
    translators = {
        "float": load(fluent_workdir),
        "int8": load(fluent_workdir, quantization="int8"),
        "int8_kv": load(fluent_workdir, kv_cache="int8"),
        "ct2_float": load(export_ctranslate2(fluent_workdir, tmp_path / "f"), engine="ctranslate2"),
        "ct2_int8": load(
            export_ctranslate2(fluent_workdir, tmp_path / "q", quantization="int8"),
            engine="ctranslate2",
        ),
    }
    assert translators["int8"].config.quantization == "int8"
    assert translators["int8_kv"].config.kv_cache == "int8"
    assert any(leaf.dtype == jnp.int8 for leaf in jax.tree.leaves(translators["int8"].params))

    def same(a: list[str], b: list[str]) -> int:
        return sum(x == y for x, y in zip(a, b, strict=True))

    for method in ("greedy", "beam"):
        out = {name: t.translate(sources, method=method) for name, t in translators.items()}
        bleu = {name: evaluation.score(h, references)["bleu"] for name, h in out.items()}
        assert bleu["float"] > 20, bleu  # a model that translates: the comparison means something
        # int8 costs no more than it costs CTranslate2 (whose beam differs in its length penalty).
        theirs = abs(bleu["ct2_int8"] - bleu["ct2_float"])
        assert abs(bleu["int8"] - bleu["float"]) <= theirs + 0.5, (method, bleu)
        assert abs(bleu["int8_kv"] - bleu["float"]) <= 1.0, (method, bleu)
        assert same(out["int8_kv"], out["float"]) >= 0.9 * len(sources), method
        if method == "greedy":
            assert same(out["int8"], out["ct2_int8"]) >= 0.95 * len(sources)
    # Sampling reads the int8 cache too, and stays reproducible for a seed.
    both = load(fluent_workdir, quantization="int8", kv_cache="int8")
    sampled = [both.translate(sources[:8], method="sample", seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_int8_ensemble_of_a_model_with_itself_decodes_as_the_model(trained_workdir: Path) -> None:
    from transformer_jax import load

    sources, _ = _test_split(trained_workdir)
    options = {"quantization": "int8", "kv_cache": "int8"}
    alone = load(trained_workdir, 30, **options)
    pair = load(trained_workdir, [30, 30], **options)
    assert all(c.quantization == "int8" for c in pair.member_configs)
    for method in ("greedy", "beam"):
        assert pair.translate(sources, method=method) == alone.translate(sources, method=method)


def test_ensemble_members_must_be_quantized_alike(trained_workdir: Path) -> None:
    from transformer_jax import load

    with pytest.raises(ValueError, match="--quantization: ensemble members quantized differently"):
        load(trained_workdir, [20, 30], quantization=["int8", "none"])
    config = ModelConfig(**SMALL)
    with pytest.raises(ValueError, match="--kv_cache: ensemble member 1"):
        Ensemble((config, config.replace(kv_cache="int8"))).init(
            jax.random.key(0), jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32)
        )


def test_load_refuses_unknown_names_and_ctranslate2(trained_workdir: Path) -> None:
    from transformer_jax import load

    with pytest.raises(ValueError, match="quantization='int4': unknown; choose one of none, int8"):
        load(trained_workdir, quantization="int4")
    with pytest.raises(ValueError, match="kv_cache='fp8': unknown"):
        load(trained_workdir, kv_cache="fp8")
    with pytest.raises(ValueError, match="export's own quantization applies"):
        load(trained_workdir, engine="ctranslate2", quantization="int8")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantization", "int4"], "error: --quantization='int4': unknown; choose one of"),
        (["--kv_cache", "int4"], "error: --kv_cache='int4': unknown; choose one of"),
        (
            ["--quantization", "int8", "--engine", "ctranslate2"],
            "error: --quantization is the JAX engine's; with --engine ctranslate2 the export's",
        ),
        (
            ["--step", "20", "30", "--quantization", "int8", "none"],
            "error: --quantization: ensemble members quantized differently",
        ),
        (
            ["--step", "20", "30", "--quantization", "int8", "int8", "int8"],
            "error: --quantization: 3 names for 2 models",
        ),
    ],
    ids=["unknown", "unknown_kv", "ctranslate2", "ensemble", "count"],
)
def test_translate_flags_refuse_in_one_line(
    flags: list[str], message: str, trained_workdir: Path
) -> None:
    result = run_module(
        "transformer_jax.translate", "--workdir", str(trained_workdir), *flags, stdin="Hello.\n"
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message), result.stderr


def test_training_refuses_a_quantized_model(small_corpus: Path) -> None:
    from conftest import tiny_train_config, with_value

    from transformer_jax import experiment

    config = with_value(tiny_train_config(small_corpus), "model.quantization", "int8")
    with pytest.raises(ValueError, match=r"config\.model\.quantization: .int8. is for decoding"):
        experiment.validate(config)
