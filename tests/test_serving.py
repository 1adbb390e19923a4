"""Serving: export to CTranslate2 (fidelity per model variant), its engine, n-best output."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from conftest import run_module

from transformer_jax import evaluation, load
from transformer_jax.config import EOS_ID, ModelConfig
from transformer_jax.model import Transformer
from transformer_jax.workdir import Workdir

ctranslate2 = pytest.importorskip("ctranslate2")

from transformer_jax.export import export_ctranslate2  # noqa: E402
from transformer_jax.interop import ctranslate2 as ct2_format  # noqa: E402


def _test_split(workdir: Path) -> tuple[list[str], list[str]]:
    """The test sources and references of the corpus the workdir was trained on."""
    config = json.loads((workdir / Workdir.EXPERIMENT_CONFIG).read_text())
    corpus = Path(config["data"]["options"]["source_path"]).parent
    return (
        (corpus / "test.en").read_text().splitlines(),
        (corpus / "test.de").read_text().splitlines(),
    )


@pytest.fixture(scope="module")
def exported(trained_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained workdir exported as float32 and int8 CTranslate2 models."""
    root = tmp_path_factory.mktemp("exported")
    return {
        quantization or "float32": export_ctranslate2(
            trained_workdir, root / (quantization or "float32"), quantization=quantization
        )
        for quantization in (None, "int8")
    }


def test_exported_model_decodes_as_ours(trained_workdir: Path, exported: dict[str, Path]) -> None:
    sources, references = _test_split(trained_workdir)
    ours = load(trained_workdir)
    theirs = load(exported["float32"], engine="ctranslate2")
    int8 = load(exported["int8"], engine="ctranslate2")
    greedy = {"method": "greedy"}
    ours_greedy, theirs_greedy = (
        ours.translate(sources, **greedy),
        theirs.translate(sources, **greedy),
    )
    same = sum(a == b for a, b in zip(ours_greedy, theirs_greedy, strict=True))
    assert same >= 0.99 * len(sources), (same, len(sources))
    bleu = {
        name: evaluation.score(t.translate(sources), references)["bleu"]
        for name, t in (("ours", ours), ("ct2", theirs), ("int8", int8))
    }
    # Beam 4 differs only by the length penalty's form (|Y|^alpha there, GNMT here).
    assert abs(bleu["ct2"] - bleu["ours"]) <= 0.3, bleu
    assert abs(bleu["int8"] - bleu["ours"]) <= 1.0, bleu
    meta = json.loads((exported["float32"] / ct2_format.EXPORT_META).read_text())
    assert meta["step"] == 30 and ModelConfig.from_dict(meta["model_config"]) == ours.config


def test_the_export_translates_as_ours_in_ctranslate2_alone(
    trained_workdir: Path, exported: dict[str, Path]
) -> None:
    """CTranslate2 as its documentation shows: pieces in, pieces out, nothing of ours between."""
    sources, references = _test_split(trained_workdir)
    model_dir = exported["float32"]
    assert json.loads((model_dir / "config.json").read_text())["add_source_eos"] is True
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / ct2_format.EXPORT_TOKENIZER))
    translator = ctranslate2.Translator(str(model_dir), device="cpu")
    ours = load(trained_workdir)

    def plain(**options: object) -> list[str]:
        texts = []
        for pieces in sp.encode(sources, out_type=str):  # no EOS added by hand: the folder adds it
            # The paper's cap, source + 50 (CTranslate2 counts neither EOS), within the table
            # of max_len positions; this tiny model's outputs run to it.
            cap = min(len(pieces) + 1 + 50, ours.config.max_len) - 1
            (result,) = translator.translate_batch([pieces], max_decoding_length=cap, **options)
            texts.append(sp.decode(result.hypotheses[0]))
        return texts

    greedy = zip(plain(beam_size=1), ours.translate(sources, method="greedy"), strict=True)
    same = sum(a == b for a, b in greedy)
    assert same >= 0.99 * len(sources), (same, len(sources))
    # Beam 4 differs only by the length penalty's form (|Y|^alpha there, GNMT here).
    bleu = {
        "ours": evaluation.score(ours.translate(sources), references)["bleu"],
        "ct2": evaluation.score(plain(beam_size=4, length_penalty=0.6), references)["bleu"],
    }
    assert abs(bleu["ct2"] - bleu["ours"]) <= 0.3, bleu


def test_an_export_of_format_1_still_decodes_with_its_own_eos_rule(
    trained_workdir: Path, exported: dict[str, Path], tmp_path: Path
) -> None:
    """Before format 2 the folder said add_source_eos=false and expected EOS in its input."""
    old = tmp_path / "format1"
    shutil.copytree(exported["float32"], old)
    config_path, meta_path = old / "config.json", old / ct2_format.EXPORT_META
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "add_source_eos": False})
    )
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 1}))
    sources, _ = _test_split(trained_workdir)
    new = load(exported["float32"], engine="ctranslate2").translate(sources, method="greedy")
    assert load(old, engine="ctranslate2").translate(sources, method="greedy") == new
    # A folder that adds BOS was not written by us: refused, not misread.
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "add_source_bos": True})
    )
    with pytest.raises(ValueError, match=r"config\.json: add_source_bos is true"):
        load(old, engine="ctranslate2")


VARIANTS = {
    "paper": {},
    "pre_rms_swiglu_gqa_learned_untied_nobias": {
        "norm_position": "pre",
        "norm_type": "rmsnorm",
        "feed_forward": "swiglu",
        "num_kv_heads": 1,
        "position_encoding": "learned",
        "embedding_sharing": "none",
        "use_bias": False,
    },
    "gqa_two_kv_heads_of_four": {"num_heads": 4, "num_kv_heads": 2},
    "no_positions": {"position_encoding": "none"},
    "gelu_target_sharing_scanned": {
        "feed_forward": "gelu",
        "embedding_sharing": "target",
        "scan_layers": True,
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_scores_as_ours(variant: str, trained_workdir: Path, tmp_path: Path) -> None:
    """CTranslate2's teacher-forced log-probs of a random model equal ours (1e-4)."""
    tokenizer = Workdir(trained_workdir).load_tokenizer()
    overrides = {"num_heads": 2, **VARIANTS[variant]}
    config = ModelConfig.preset(
        "tiny",
        vocab_size=tokenizer.vocab_size + 3,  # rows past the pieces export as padding tokens
        d_model=32,
        d_ff=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_len=48,
        **overrides,
    )
    model = Transformer(config)
    dummy = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), dummy, dummy)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )
    run = Workdir(tmp_path / "random")
    run.path.mkdir()
    run.write_model_config(config)
    (run.path / Workdir.TOKENIZER).write_bytes(Path(tokenizer.path).read_bytes())
    run.save_params(1, params)
    out = export_ctranslate2(run, tmp_path / "ct2")
    translator = ctranslate2.Translator(str(out), device="cpu")
    sources = ["The teacher buys the red bags.", "Tomorrow we go home."]
    targets = ["Der Lehrer kauft die roten Taschen.", "Morgen gehen wir nach Hause."]
    pieces = tokenizer.processor.id_to_piece
    for source, target in zip(sources, targets, strict=True):
        src_ids = [*tokenizer.encode(source), EOS_ID]
        tgt_ids = [*tokenizer.encode(target), EOS_ID]
        logits = model.apply({"params": params}, jnp.asarray([src_ids]), jnp.asarray([tgt_ids]))
        ours = np.take_along_axis(
            np.asarray(jax.nn.log_softmax(logits))[0], np.asarray(tgt_ids)[:, None], axis=-1
        )[:, 0]
        (result,) = translator.score_batch(
            [[pieces(i) for i in src_ids[:-1]]], [[pieces(i) for i in tgt_ids[:-1]]]
        )
        # CTranslate2 appends the source's EOS (the folder's add_source_eos) and the target's
        # itself, and scores the target's too.
        np.testing.assert_allclose(result.log_probs, ours, atol=1e-4, err_msg=variant)


def test_a_switch_without_a_mapping_is_refused_by_name(
    trained_workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every current switch maps; a new one (here: norm_type, as if just added) must not export.
    monkeypatch.delitem(ct2_format._EXPRESSIBLE, "norm_type")
    with pytest.raises(ValueError, match=r"ModelConfig\.norm_type='layernorm' \(no CTranslate2"):
        export_ctranslate2(trained_workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_config_field_added_later_is_refused_by_both_exporters(
    trained_workdir: Path, tmp_path: Path
) -> None:
    """Both exporters allow-list fields: one neither knows is refused, naming it, not ignored."""
    from transformer_jax.interop import huggingface

    @dataclasses.dataclass(frozen=True)
    class WithNewSwitch(ModelConfig):
        attention_sinks: int = 4

    trained = load(trained_workdir).config
    config = WithNewSwitch(**trained.to_dict())
    for unsupported, tool in (
        (ct2_format.unsupported, "CTranslate2"),
        (huggingface.unsupported, "MarianMTModel"),
    ):
        assert unsupported(config) == [f"attention_sinks=4 (no {tool} mapping for this switch)"]
        assert unsupported(trained) == [], tool


@pytest.mark.slow
def test_export_command_refuses_bad_input_in_one_line(
    trained_workdir: Path, exported: dict[str, Path], tmp_path: Path
) -> None:
    base = ["--workdir", str(trained_workdir), "--output", str(tmp_path / "m")]
    unknown_format = run_module("transformer_jax.export", *base, "--format", "onnx")
    assert unknown_format.returncode == 2 and "invalid choice: 'onnx'" in unknown_format.stderr
    bad_quant = run_module(
        "transformer_jax.export", *base, "--format", "ctranslate2", "--quantization", "int4"
    )
    assert bad_quant.returncode == 2 and "invalid choice: 'int4'" in bad_quant.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / Workdir.MODEL_CONFIG).write_text(
        (trained_workdir / Workdir.MODEL_CONFIG).read_text()
    )
    (tmp_path / "empty" / Workdir.TOKENIZER).write_bytes(
        (trained_workdir / Workdir.TOKENIZER).read_bytes()
    )
    no_checkpoints = run_module(
        "transformer_jax.export",
        "--workdir",
        str(tmp_path / "empty"),
        "--format",
        "ctranslate2",
        "--output",
        str(tmp_path / "m"),
    )
    assert no_checkpoints.returncode == 1 and "no checkpoints" in no_checkpoints.stderr
    exists = ["--workdir", str(trained_workdir), "--output", str(exported["float32"])]
    refused = run_module("transformer_jax.export", *exists, "--format", "ctranslate2")
    assert refused.returncode == 1 and "already exists; pass --force" in refused.stderr
    for result in (no_checkpoints, refused):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_translate_command_serves_the_export_with_nbest(
    trained_workdir: Path, exported: dict[str, Path]
) -> None:
    lines = ["The doctors can drink the tomato juice.", "", "Tomorrow the teacher buys bags."]
    stdin = "\n".join(lines) + "\n"
    served = run_module(
        "transformer_jax.translate",
        "--workdir",
        str(exported["float32"]),
        "--engine",
        "ctranslate2",
        "--method",
        "greedy",
        stdin=stdin,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    expected = load(trained_workdir).translate(lines, method="greedy")
    assert served.stdout.split("\n")[:-1] == expected
    for engine, workdir in (("jax", trained_workdir), ("ctranslate2", exported["float32"])):
        nbest = run_module(
            "transformer_jax.translate",
            "--workdir",
            str(workdir),
            "--engine",
            engine,
            "--nbest",
            "3",
            stdin=stdin,
        )
        assert nbest.returncode == 0, nbest.stderr[-3000:]
        rows = [line.split("\t") for line in nbest.stdout.splitlines()]
        assert [r[0] for r in rows] == ["H-0"] * 3 + ["H-1"] * 3 + ["H-2"] * 3, engine
        scores = [float(r[1]) for r in rows]
        assert scores[0] >= scores[1] >= scores[2] and scores[3] == -np.inf, (engine, scores)
        assert rows[3][2] == "" and len({r[2] for r in rows[:3]}) == 3, (engine, rows)


def test_jax_nbest_are_distinct_best_first_and_begin_with_the_best(
    trained_workdir: Path,
) -> None:
    translator = load(trained_workdir)
    sentences, _ = _test_split(trained_workdir)
    found = translator.translate_nbest(sentences[:6], nbest=4)
    best = translator.translate(sentences[:6])
    for hypotheses, one in zip(found, best, strict=True):
        texts, scores = zip(*hypotheses, strict=True)
        assert len(set(texts)) == 4 and list(scores) == sorted(scores, reverse=True)
        assert texts[0] == one
    with pytest.raises(ValueError, match=r"nbest=5: must be at most 4"):
        translator.translate_nbest(sentences[:1], nbest=5)
