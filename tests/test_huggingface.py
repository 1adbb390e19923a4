"""Hugging Face Marian interop: import a MarianMTModel, export ours; checked against transformers.

Every model is built here: a random MarianMTModel from a small MarianConfig with sentencepiece
models trained on the built-in corpus (nothing is downloaded), and the shared trained workdir.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import checkpoint_params, run_module, tiny_train_config
from safetensors.numpy import load_file
from transformers import MarianConfig, MarianMTModel, MarianTokenizer

from transformer_jax import convert, load
from transformer_jax.config import EOS_ID, PAD_ID, UNK_ID
from transformer_jax.data.corpus import CorpusSizes, builtin_corpus
from transformer_jax.inference.decode import greedy_decode
from transformer_jax.interop.huggingface import marian_files, spm_models_of, unsupported
from transformer_jax.model import stack_layer_params
from transformer_jax.training.loop import train_and_evaluate
from transformer_jax.workdir import Workdir

SENTENCES = 20
MAX_NEW_TOKENS = 24


def _pairs(split: str, count: int) -> list[tuple[str, str]]:
    sizes = CorpusSizes(train=600, validation=32, test=32)
    return builtin_corpus(seed=0, sizes=sizes)[split][:count]


def _train_spm(lines: list[str], prefix: Path, size: int) -> Path:
    text = prefix.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Marian's own spm models number unk 0, bos 1, eos 2 (the vocabulary renumbers them).
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        vocab_size=size,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def marian_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random MarianMTModel (swish, tied embeddings, Marian's ids) saved with save_pretrained."""
    root = tmp_path_factory.mktemp("marian")
    train = _pairs("train", 600)
    source = _train_spm([s for s, _ in train], root / "source", 160)
    target = _train_spm([t for _, t in train], root / "target", 160)
    # Marian's layout: </s> 0, <unk> 1, the pieces of both models, <pad> last.
    pieces = ["</s>", "<unk>"]
    for model in (source, target):
        processor = spm.SentencePieceProcessor(model_file=str(model))
        for i in range(processor.get_piece_size()):
            piece = processor.id_to_piece(i)
            if not (processor.is_control(i) or processor.is_unknown(i)) and piece not in pieces:
                pieces.append(piece)
    pieces.append("<pad>")
    vocab = root / "vocab.json"
    vocab.write_text(json.dumps({p: i for i, p in enumerate(pieces)}), encoding="utf-8")
    pad = len(pieces) - 1
    config = MarianConfig(
        vocab_size=len(pieces),
        decoder_vocab_size=len(pieces),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        activation_function="swish",
        max_position_embeddings=128,
        pad_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        decoder_start_token_id=pad,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        init_std=0.15,
    )
    torch.manual_seed(0)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        # Biases, norms and the logits bias start at 0 / 1: randomize them, or a wrong channel
        # order or id order in them could not show.
        for name, tensor in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                tensor.add_(torch.randn_like(tensor) * 0.1)
        model.final_logits_bias.normal_(0.0, 0.5)
    folder = root / "hf"
    model.save_pretrained(folder)
    MarianTokenizer(str(source), str(target), str(vocab)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(marian_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Marian folder converted to a workdir."""
    return convert.import_marian(marian_folder, tmp_path_factory.mktemp("imported") / "run")


def _hf(folder: Path) -> tuple[MarianMTModel, MarianTokenizer]:
    return MarianMTModel.from_pretrained(folder).eval(), MarianTokenizer.from_pretrained(folder)


def _our_batch(translator, texts: list[str], side: str) -> np.ndarray:
    rows = [[*translator.tokenizer.encode(t, side=side), EOS_ID] for t in texts]
    out = np.full((len(rows), max(map(len, rows))), PAD_ID, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _assert_same_logits(translator, src: np.ndarray, tgt: np.ndarray, hf_logits) -> None:
    """Our teacher-forced logits equal transformers' (in our id order) on real targets, to 1e-4."""
    logits = np.asarray(translator.model.apply({"params": translator.params}, src, tgt))
    valid = tgt != PAD_ID
    theirs = hf_logits[: len(tgt), : tgt.shape[1]]
    np.testing.assert_allclose(logits[valid], theirs[valid], atol=1e-4)


def _hf_logits(model: MarianMTModel, hf_tok: MarianTokenizer, pairs: list[tuple[str, str]]):
    batch = hf_tok(
        [s for s, _ in pairs], text_target=[t for _, t in pairs], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).logits
    return batch, logits.numpy()


def _our_greedy(translator, src: np.ndarray) -> list[list[int]]:
    tokens = greedy_decode(
        translator.model,
        translator.params,
        jnp.asarray(src),
        max_length=MAX_NEW_TOKENS,
        extra_length=1000,
    )
    return [_until_eos(row) for row in np.asarray(tokens).tolist()]


def _until_eos(ids: list[int], eos: int = EOS_ID) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_imported_logits_and_greedy_equal_transformers(marian_folder: Path, imported: Path) -> None:
    translator = load(imported)
    assert translator.config.feed_forward == "swish"
    assert translator.config.logits_bias  # the folder's final_logits_bias is not zero
    assert translator.config.decoder_start_id == PAD_ID  # Marian starts from its pad piece
    model, hf_tok = _hf(marian_folder)
    pad = model.config.pad_token_id
    # Renumbered: pad, eos (0), unk (1) first, every other piece in its order.
    order = np.asarray([pad, 0, 1, *range(2, pad)])
    recorded = (imported / "imported_from.txt").read_text()
    assert f"were {pad}, 0, 1" in recorded
    ours_of = {int(m): r for r, m in enumerate(order)}
    pairs = _pairs("test", SENTENCES)

    # Ids: our tokenizer gives MarianTokenizer's ids, renumbered.
    batch, hf_logits = _hf_logits(model, hf_tok, pairs)
    src = _our_batch(translator, [s for s, _ in pairs], "source")
    tgt = _our_batch(translator, [t for _, t in pairs], "target")
    for ours, theirs in ((src, batch["input_ids"]), (tgt, batch["labels"])):
        mapped = np.vectorize(ours_of.get)(theirs.numpy())
        np.testing.assert_array_equal(ours, mapped[:, : ours.shape[1]])

    # Teacher-forced logits, on every real target position, to 1e-4.
    _assert_same_logits(translator, src, tgt, hf_logits[..., order])

    # Greedy: generate(num_beams=1) token for token. Marian's OPUS-MT generation configs ban
    # the pad piece, as our decoders always do.
    with torch.no_grad():
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            num_beams=1,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            bad_words_ids=[[pad]],
            forced_eos_token_id=0,
        ).numpy()
    theirs = [_until_eos([ours_of[int(t)] for t in row[1:]]) for row in generated]
    assert _our_greedy(translator, src) == theirs


def _marian_to_ours(model: MarianMTModel) -> dict[int, int]:
    """The folder's id -> ours, as the import renumbers them (pad, eos, unk first)."""
    pad = model.config.pad_token_id
    return {int(m): r for r, m in enumerate([pad, 0, 1, *range(2, pad)])}


def test_imported_vocabulary_decodes_every_id_as_marian_tokenizer(
    marian_folder: Path, imported: Path
) -> None:
    """Every piece, in sequences mixing target-only, source-only and special pieces."""
    model, hf_tok = _hf(marian_folder)
    ours_of = _marian_to_ours(model)
    tokenizer = load(imported).tokenizer
    source = spm.SentencePieceProcessor(model_file=str(marian_folder / "source.spm"))
    target = spm.SentencePieceProcessor(model_file=str(marian_folder / "target.spm"))
    pieces = tokenizer.pieces
    known = {
        name: {m.id_to_piece(i) for i in range(len(m))}
        for name, m in (("s", source), ("t", target))
    }
    target_only = [i for i, p in enumerate(pieces) if p in known["t"] - known["s"]]
    assert len(target_only) >= 10  # the pieces that printed raw (▁ticket▁ticket) before
    rng = np.random.default_rng(0)
    ids = rng.permutation([m for m in ours_of if m != model.config.eos_token_id])
    specials = [model.config.pad_token_id, hf_tok.unk_token_id]
    compared = 0
    for chunk in np.array_split(ids, len(ids) // 6):
        theirs = [int(i) for i in chunk]
        theirs.insert(int(rng.integers(len(theirs))), int(rng.choice(specials)))
        theirs += [model.config.eos_token_id, model.config.pad_token_id]
        ours = [ours_of[i] for i in theirs]
        assert tokenizer.decode(ours) == hf_tok.decode(theirs, skip_special_tokens=True), theirs
        compared += 1
    assert compared * 6 >= len(ids) - 6


def test_imported_model_translates_as_generate_and_batch_decode(
    marian_folder: Path, imported: Path
) -> None:
    """The text a user reads: translate(method=greedy) against transformers' own pipeline."""
    model, hf_tok = _hf(marian_folder)
    translator = load(imported)
    sources = [s for s, _ in _pairs("test", SENTENCES)]
    theirs = []
    for text in sources:
        batch = hf_tok([text], return_tensors="pt")
        # Our cap: source length (EOS included) + 50, within max_len; EOS forced at it.
        cap = min(batch["input_ids"].shape[1] + 50, translator.config.max_len)
        with torch.no_grad():
            generated = model.generate(
                **batch,
                num_beams=1,
                do_sample=False,
                max_new_tokens=cap,
                bad_words_ids=[[model.config.pad_token_id]],
                forced_eos_token_id=model.config.eos_token_id,
            )
        theirs += hf_tok.batch_decode(generated, skip_special_tokens=True)
    assert translator.translate(sources, method="greedy") == theirs


def test_imported_model_exports_back_to_the_same_folder(
    marian_folder: Path, imported: Path, tmp_path: Path
) -> None:
    out = convert.export_marian(imported, tmp_path / "back")
    # Marian's own layout again: the same ids, vocabulary and tensors as the original.
    assert json.loads((out / "vocab.json").read_text()) == json.loads(
        (marian_folder / "vocab.json").read_text()
    )
    original, exported = (json.loads((f / "config.json").read_text()) for f in (marian_folder, out))
    for field in ("pad_token_id", "eos_token_id", "decoder_start_token_id", "vocab_size"):
        assert exported[field] == original[field], field
    before = load_file(str(marian_folder / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() <= after.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_exported_default_model_loads_in_transformers_and_round_trips(
    trained_workdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "hf"
    with caplog.at_level(logging.WARNING):
        convert.export_marian(trained_workdir, out)
    assert "epsilon" in caplog.text  # our 1e-6 against PyTorch's 1e-5, said once
    translator = load(trained_workdir)
    model, hf_tok = _hf(out)
    pairs = _pairs("test", SENTENCES)
    batch, hf_logits = _hf_logits(model, hf_tok, pairs)
    src = _our_batch(translator, [s for s, _ in pairs], "source")
    tgt = _our_batch(translator, [t for _, t in pairs], "target")
    np.testing.assert_array_equal(src, batch["input_ids"].numpy()[:, : src.shape[1]])
    _assert_same_logits(translator, src, tgt, hf_logits)

    # The folder's own generation config (bans PAD and BOS, forces EOS at the cap).
    with torch.no_grad():
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=MAX_NEW_TOKENS,
        ).numpy()
    theirs = [_until_eos([int(t) for t in row[1:]]) for row in generated]
    ours = _our_greedy(translator, src)
    assert ours == theirs
    # MarianTokenizer turns the same ids into the same text (it drops an unk piece, we print
    # sentencepiece's mark: rows holding one are left out).
    hf_text = hf_tok.batch_decode([row[1:] for row in generated], skip_special_tokens=True)
    compared = [i for i, ids in enumerate(ours) if UNK_ID not in ids]
    assert len(compared) >= SENTENCES // 2
    for i in compared:
        assert translator.tokenizer.decode(ours[i]) == hf_text[i]

    # The command: an existing folder needs --force, and then only an earlier export.
    with pytest.raises(SystemExit, match="already exists; pass --force"):
        convert.main(["--workdir", str(trained_workdir), "--to-huggingface", str(out)])
    assert (
        convert.main(["--workdir", str(trained_workdir), "--to-huggingface", str(out), "--force"])
        == 0
    )

    # Scanned parameters export to the same tensors.
    scanned = tmp_path / "scanned"
    Workdir(trained_workdir).copy_metadata_to(Workdir(scanned))
    (scanned / "model_config.json").unlink()
    Workdir(scanned).write_model_config(translator.config.replace(scan_layers=True))
    Workdir(scanned).save_params(7, stack_layer_params(translator.params))
    convert.export_marian(scanned, tmp_path / "hf_scanned")
    a, b = (
        load_file(str(out / "model.safetensors")),
        load_file(str(tmp_path / "hf_scanned" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # Imported back: the very same parameters.
    back = convert.import_marian(out, tmp_path / "back")
    for a, b in zip(
        checkpoint_params(trained_workdir, translator.step), checkpoint_params(back, 0), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert load(back).config == translator.config.replace(layer_norm_epsilon=1e-5)


def test_imported_model_fine_tunes_and_resumes(
    imported: Path, small_corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_train_config(small_corpus)
    config.model_from_workdir = True
    config.data.test_split = ""
    config.train.num_steps = 6
    config.train.log_every = 1
    config.train.checkpoint_every = 3
    config.train.eval_bleu_sentences = 4
    config.optim.learning_rate_scale = 0.5
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(imported, straight)
    shutil.copytree(imported, resumed)
    with caplog.at_level(logging.INFO, logger="transformer_jax"):
        train_and_evaluate(config, straight)
    assert "Starting from the parameters of checkpoint 0" in caplog.text
    losses = [float(x) for x in re.findall(r"step \d+: loss=([\d.]+)", caplog.text)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses

    first = train_and_evaluate(config, resumed, stop_after=3)
    assert first.stopped_by == "stopped" and first.step == 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transformer_jax"):
        second = train_and_evaluate(config, resumed)
    assert "Restored step 3" in caplog.text and second.step == 6
    for a, b in zip(checkpoint_params(straight, 6), checkpoint_params(resumed, 6), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_first_checkpoint_falls_back_to_the_imported_parameters(
    imported: Path, small_corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_train_config(small_corpus)
    config.model_from_workdir = True
    config.data.test_split = ""
    config.train.num_steps = 4
    config.train.checkpoint_every = 2
    run = tmp_path / "run"
    shutil.copytree(imported, run)
    train_and_evaluate(config, run, stop_after=2)
    for path in (run / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"damaged")
    with caplog.at_level(logging.INFO, logger="transformer_jax"):
        result = train_and_evaluate(config, run)
    assert "Starting from the parameters of checkpoint 0" in caplog.text
    assert (run / "damaged_checkpoints" / "2").is_dir() and result.step == 4


def test_pytorch_weights_import_as_safetensors_do(
    marian_folder: Path, imported: Path, tmp_path: Path
) -> None:
    folder = _copy_without(marian_folder, tmp_path, "model.safetensors")
    model, _ = _hf(marian_folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    from_bin = convert.import_marian(folder, tmp_path / "from_bin")
    for a, b in zip(checkpoint_params(imported, 0), checkpoint_params(from_bin, 0), strict=True):
        np.testing.assert_array_equal(a, b)


def _copy_without(folder: Path, tmp_path: Path, *names: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for name in names:
        (copy / name).unlink()
    return copy


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _refusal(folder: Path, tmp_path: Path) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        convert.import_marian(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_folders_are_refused_naming_file_and_field(marian_folder: Path, tmp_path: Path) -> None:
    bert = _copy_without(marian_folder, tmp_path)
    _edit_json(bert / "config.json", model_type="bert")
    message = _refusal(bert, tmp_path)
    assert "config.json" in message and "model_type" in message and "'bert'" in message
    shutil.rmtree(bert)

    no_weights = _copy_without(marian_folder, tmp_path, "model.safetensors")
    assert "model.safetensors" in _refusal(no_weights, tmp_path)
    shutil.rmtree(no_weights)

    pre_ln = _copy_without(marian_folder, tmp_path)
    _edit_json(pre_ln / "config.json", normalize_before=True)
    assert "config.json: normalize_before=True" in _refusal(pre_ln, tmp_path)
    _edit_json(pre_ln / "config.json", normalize_before=False, activation_function="gelu")
    assert "activation_function='gelu'" in _refusal(pre_ln, tmp_path)
    shutil.rmtree(pre_ln)

    other_vocab = _copy_without(marian_folder, tmp_path)
    table = json.loads((other_vocab / "vocab.json").read_text())
    renamed = {f"x{p}" if i > 1 and i < len(table) - 1 else p: i for p, i in table.items()}
    (other_vocab / "vocab.json").write_text(json.dumps(renamed))
    message = _refusal(other_vocab, tmp_path)
    assert "vocab.json" in message and "source.spm" in message and "disagree" in message
    (other_vocab / "vocab.json").write_text(json.dumps(dict(list(table.items())[:-1])))
    assert "vocab_size" in _refusal(other_vocab, tmp_path)
    shutil.rmtree(other_vocab)

    hub = run_module(
        "transformer_jax.convert",
        "--from-huggingface",
        "Helsinki-NLP/opus-mt-en-de",
        "--workdir",
        str(tmp_path / "w"),
    )
    assert hub.returncode != 0
    assert hub.stderr.strip().splitlines()[-1] == (
        "error: Helsinki-NLP/opus-mt-en-de: no such folder. convert never downloads; if this is "
        "a Hugging Face hub id, download it first (hf download Helsinki-NLP/opus-mt-en-de "
        "--local-dir opus-mt-en-de) and pass --from-huggingface opus-mt-en-de"
    )

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        convert.import_marian(marian_folder, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_models_marian_cannot_express_are_refused_by_field(trained_workdir: Path) -> None:
    translator = load(trained_workdir)
    for change, field in (
        ({"norm_position": "pre"}, "norm_position"),
        ({"feed_forward": "swiglu"}, "feed_forward"),
        ({"num_heads": 2, "num_kv_heads": 1}, "num_kv_heads"),
        ({"position_encoding": "learned"}, "position_encoding"),
    ):
        config = translator.config.replace(**change)
        assert [p for p in unsupported(config) if p.startswith(field)], change
        with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
            marian_files(config, {}, translator.tokenizer, spm_models_of(translator.tokenizer))
    assert unsupported(translator.config) == []


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu (pip install -e ".[dev]")'
)
def test_aot_compiles_the_imported_model_for_a_tpu_slice(imported: Path) -> None:
    from configs import finetune
    from transformer_jax import aot

    report = aot.run(aot._adopted(finetune.get_config(), str(imported)), "v5e-4")
    assert report.num_params == sum(x.size for x in checkpoint_params(imported, 0))
    assert report.fits
    with pytest.raises(ValueError, match="pass --workdir DIR"):
        aot._adopted(finetune.get_config(), None)
