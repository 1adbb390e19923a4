"""Hugging Face Marian folders (MarianMTModel, OPUS-MT) to our model and back.

A Marian model is the paper's post-LN Transformer up to choices that are ModelConfig fields:
its FFN activation (`feed_forward="swish"` for OPUS-MT), a bias on the logits (`logits_bias`,
set when the folder's final_logits_bias is not all zero), the decoder's start token (Marian
starts from its pad piece: `decoder_start_id`) and LayerNorm's epsilon (PyTorch's 1e-5). Two
differences are renamings, applied exactly on the way in and undone on the way out:

- Channels. Marian lays the sinusoid out as all sines then all cosines; the paper (and we)
  interleave them. Renaming the d_model channels of the residual stream (`_HALVES`) turns one
  layout into the other; LayerNorm and every projection compute the same function on renamed
  channels, so embeddings, projections and norms are permuted along d_model.
- Ids. Marian numbers its vocabulary with eos 0, unk 1 and pad last; we need pad, EOS and unk
  at PAD_ID, EOS_ID and UNK_ID. The import moves those three rows first and keeps every other
  piece in its order; our vocab.json records the new numbering, so text encodes the same. The
  export writes imported models (decoder_start_id == PAD_ID) in Marian's order again
  (`export_order`) and ours in our own.

Reading needs `safetensors` (or `torch` for pytorch_model.bin); writing needs `safetensors`.
Neither imports transformers, and nothing here touches a network.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from transformer_jax.config import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    EmbeddingSharing,
    FeedForwardType,
    ModelConfig,
)
from transformer_jax.data.tokenizer import (
    Tokenizer,
    VocabTokenizer,
    load_processor,
    read_vocab_json,
)
from transformer_jax.interop import fields
from transformer_jax.interop.ctranslate2 import vocabulary

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_WEIGHTS = "pytorch_model.bin"
SOURCE_SPM = "source.spm"
TARGET_SPM = "target.spm"
VOCAB = "vocab.json"
# PyTorch's nn.LayerNorm default, which MarianMTModel uses (its config has no field for it).
MARIAN_LAYER_NORM_EPSILON = 1e-5

# MarianConfig's defaults (transformers 5.x), for fields a config.json leaves out.
_MARIAN_DEFAULTS: dict[str, Any] = {
    "vocab_size": 58101,
    "decoder_vocab_size": None,
    "max_position_embeddings": 1024,
    "encoder_layers": 12,
    "encoder_ffn_dim": 4096,
    "encoder_attention_heads": 16,
    "decoder_layers": 12,
    "decoder_ffn_dim": 4096,
    "decoder_attention_heads": 16,
    "activation_function": "gelu",
    "d_model": 1024,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "decoder_start_token_id": 58100,
    "scale_embedding": False,
    "pad_token_id": 58100,
    "eos_token_id": 0,
    "share_encoder_decoder_embeddings": True,
    "tie_word_embeddings": True,
}
# Hugging Face activation names -> ours. flax's nn.gelu is the tanh approximation, which is
# Hugging Face's gelu_new / gelu_pytorch_tanh (its "gelu" is the exact erf form).
_ACTIVATIONS: dict[str, FeedForwardType] = {
    "swish": "swish",
    "silu": "swish",
    "relu": "relu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
}
_EXPORTED_ACTIVATIONS = {"swish": "swish", "relu": "relu", "gelu": "gelu_new"}
# Switches of related architectures (BART, older Marian configs) that Marian must have off.
_MUST_BE_OFF = (
    "normalize_before",
    "add_final_layer_norm",
    "normalize_embedding",
    "layernorm_embedding",
    "add_bias_logits",
)


@dataclasses.dataclass
class Imported:
    """A Marian folder read into our terms: config, parameters (numpy), vocabulary, models."""

    config: ModelConfig
    params: dict[str, Any]
    pieces: list[str]  # our id order
    source_spm: bytes
    target_spm: bytes
    order: np.ndarray  # our id r is the folder's id order[r]


def _halves(d_model: int) -> np.ndarray:
    """Marian's channel c is our channel _halves(D)[c]: sines (our even channels), then cosines."""
    return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


# -- reading ------------------------------------------------------------------------------------


def read_marian(folder: Path) -> Imported:
    """Read a local MarianMTModel folder; anything we cannot represent is refused by name."""
    marian = _read_config(folder)
    pieces_marian, unk_piece = _read_vocabulary(folder, marian)
    special = [marian["pad_token_id"], marian["eos_token_id"], pieces_marian.index(unk_piece)]
    if len(set(special)) < 3:
        raise ValueError(
            f"{folder / CONFIG}: pad_token_id, eos_token_id and the unk piece {unk_piece!r} must "
            f"be three different ids (got {special})"
        )
    rest = [i for i in range(len(pieces_marian)) if i not in special]
    order = np.asarray(special + rest, np.int64)
    ours_of = {int(m): r for r, m in enumerate(order)}
    start = marian["decoder_start_token_id"]
    weights = _WeightReader(folder)
    config = _model_config(marian, folder, start_id=ours_of[start], logits_bias=False)
    params, bias = _read_params(weights, marian, config, order)
    if np.any(bias != 0):
        config = config.replace(logits_bias=True)
        params["decoder"]["logits_bias"] = bias
    return Imported(
        config=config,
        params=params,
        pieces=[pieces_marian[m] for m in order],
        source_spm=(folder / SOURCE_SPM).read_bytes(),
        target_spm=(folder / TARGET_SPM).read_bytes(),
        order=order,
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; a Hugging Face model folder has a config.json")
    raw = _read_json(path)
    model_type = raw.get("model_type")
    if model_type != "marian":
        raise ValueError(
            f"{path}: model_type is {model_type!r}, not 'marian'; convert reads MarianMTModel "
            "folders (OPUS-MT and other Marian models) only"
        )
    for field in _MUST_BE_OFF:
        if raw.get(field):
            raise ValueError(
                f"{path}: {field}={raw[field]!r} is not a Marian (post-LN) model's setting and "
                "has no counterpart here"
            )
    marian = {**_MARIAN_DEFAULTS, **raw}
    if marian["decoder_vocab_size"] is None:
        marian["decoder_vocab_size"] = marian["vocab_size"]
    checks: list[tuple[bool, str, str]] = [
        (
            marian["decoder_vocab_size"] == marian["vocab_size"],
            "decoder_vocab_size",
            "a separate target vocabulary is not supported (one vocabulary for both sides)",
        ),
        (
            marian["encoder_attention_heads"] == marian["decoder_attention_heads"],
            "decoder_attention_heads",
            "must equal encoder_attention_heads (ModelConfig has one num_heads)",
        ),
        (
            marian["encoder_ffn_dim"] == marian["decoder_ffn_dim"],
            "decoder_ffn_dim",
            "must equal encoder_ffn_dim (ModelConfig has one d_ff)",
        ),
        (
            marian["activation_function"] in _ACTIVATIONS,
            "activation_function",
            f"supported: {sorted(_ACTIVATIONS)}",
        ),
        (
            bool(marian["scale_embedding"]),
            "scale_embedding",
            "must be true (embeddings times sqrt(d_model), as in the paper)",
        ),
        (
            marian.get("static_position_embeddings", True) is not False,
            "static_position_embeddings",
            "learned Marian positions are not supported (sinusoidal only)",
        ),
        (
            not (marian["share_encoder_decoder_embeddings"] and not marian["tie_word_embeddings"]),
            "tie_word_embeddings",
            "false with shared encoder/decoder embeddings has no counterpart "
            "(embedding_sharing is all, target or none)",
        ),
        (marian["d_model"] % 2 == 0, "d_model", "must be even (sinusoid sin/cos pairs)"),
        (
            isinstance(marian["eos_token_id"], int),
            "eos_token_id",
            "must be one id (several EOS ids are not supported)",
        ),
    ]
    for ok, field, message in checks:
        if not ok:
            raise ValueError(f"{path}: {field}={marian[field]!r}: {message}")
    for field in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        value = marian[field]
        if not isinstance(value, int) or not 0 <= value < marian["vocab_size"]:
            raise ValueError(
                f"{path}: {field}={value!r} must be an id below vocab_size={marian['vocab_size']}"
            )
    if marian["decoder_start_token_id"] == marian["eos_token_id"]:
        raise ValueError(
            f"{path}: decoder_start_token_id={marian['decoder_start_token_id']} equals "
            "eos_token_id; a decoder that starts from EOS is not supported"
        )
    return marian


def _read_vocabulary(folder: Path, marian: dict[str, Any]) -> tuple[list[str], str]:
    """vocab.json's pieces in the folder's id order, and the unk piece; checked against the rest."""
    tokenizer_config = _read_tokenizer_config(folder)
    if tokenizer_config.get("separate_vocabs"):
        raise ValueError(
            f"{folder / TOKENIZER_CONFIG}: separate_vocabs=true (a target_vocab.json); only one "
            "vocabulary for both sides is supported"
        )
    unk = tokenizer_config.get("unk_token", "<unk>")
    unk = unk.get("content", "<unk>") if isinstance(unk, dict) else str(unk)
    vocab_path = folder / VOCAB
    pieces = read_vocab_json(vocab_path)
    if len(pieces) != marian["vocab_size"]:
        raise ValueError(
            f"{vocab_path}: {len(pieces)} pieces, but {CONFIG} says vocab_size="
            f"{marian['vocab_size']}; the vocabulary is not this model's"
        )
    if unk not in pieces:
        raise ValueError(f"{vocab_path}: has no unk piece {unk!r} (tokenizer_config unk_token)")
    known = set(pieces)
    for name in (SOURCE_SPM, TARGET_SPM):
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; a Marian tokenizer needs {name}")
        processor = load_processor(epath.Path(path))
        ordinary = [
            processor.id_to_piece(i)
            for i in range(processor.get_piece_size())
            if not (processor.is_control(i) or processor.is_unknown(i))
        ]
        missing = [p for p in ordinary if p not in known]
        # MarianTokenizer reads a missing piece as unk; a few may be intended, most mean the
        # vocabulary belongs to another model.
        if len(missing) > 0.05 * max(len(ordinary), 1):
            raise ValueError(
                f"{vocab_path}: {len(missing)} of the {len(ordinary)} pieces of {name} are not in "
                f"it (e.g. {missing[:3]}); the vocabulary and the sentencepiece models disagree"
            )
    return pieces, unk


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / TOKENIZER_CONFIG
    return _read_json(path) if path.exists() else {}


def _read_json(path: Path) -> dict[str, Any]:
    """One JSON object from a file; anything else is an error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected one JSON object, got {type(value).__name__}")
    return value


def _model_config(
    marian: dict[str, Any], folder: Path, *, start_id: int, logits_bias: bool
) -> ModelConfig:
    sharing: EmbeddingSharing = "all"
    if not marian["share_encoder_decoder_embeddings"]:
        sharing = "target" if marian["tie_word_embeddings"] else "none"
    try:
        return ModelConfig(
            vocab_size=marian["vocab_size"],
            d_model=marian["d_model"],
            num_heads=marian["encoder_attention_heads"],
            d_ff=marian["encoder_ffn_dim"],
            num_encoder_layers=marian["encoder_layers"],
            num_decoder_layers=marian["decoder_layers"],
            dropout_rate=float(marian["dropout"]),
            attention_dropout_rate=float(marian["attention_dropout"]),
            relu_dropout_rate=float(marian["activation_dropout"]),
            max_len=marian["max_position_embeddings"],
            embedding_sharing=sharing,
            norm_position="post",
            norm_type="layernorm",
            layer_norm_epsilon=MARIAN_LAYER_NORM_EPSILON,
            position_encoding="sinusoidal",
            feed_forward=_ACTIVATIONS[marian["activation_function"]],
            use_bias=True,
            logits_bias=logits_bias,
            decoder_start_id=start_id,
        )
    except ValueError as e:
        raise ValueError(f"{folder / CONFIG}: {e}") from e


class _WeightReader:
    """The folder's tensors by name (safetensors, sharded safetensors or pytorch_model.bin)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tensors: dict[str, np.ndarray] = {}
        if (folder / SAFETENSORS).exists():
            self.source = folder / SAFETENSORS
            self.tensors = _load_safetensors(self.source)
        elif (folder / SAFETENSORS_INDEX).exists():
            self.source = folder / SAFETENSORS_INDEX
            shards = _read_json(self.source).get("weight_map", {})
            for shard in sorted(set(shards.values())):
                self.tensors.update(_load_safetensors(folder / shard))
        elif (folder / PYTORCH_WEIGHTS).exists():
            self.source = folder / PYTORCH_WEIGHTS
            self.tensors = _load_pytorch(self.source)
        else:
            raise FileNotFoundError(
                f"{folder}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_WEIGHTS}; download "
                "the model's weights into the folder too"
            )
        # A MarianModel (no LM head) names its tensors without the "model." prefix.
        self.prefix = "model." if any(k.startswith("model.") for k in self.tensors) else ""

    def get(self, name: str, shape: tuple[int, ...], why: str) -> np.ndarray:
        """One tensor as float32, checked for presence and shape."""
        key = name if name in ("lm_head.weight", "final_logits_bias") else self.prefix + name
        if key not in self.tensors:
            raise ValueError(
                f"{self.source}: no tensor {key!r} ({why}); the weights are incomplete or not "
                "this model's"
            )
        value = np.asarray(self.tensors[key], np.float32)
        if value.shape != shape:
            raise ValueError(
                f"{self.source}: tensor {key!r} has shape {list(value.shape)}, but {CONFIG} "
                f"implies {list(shape)}"
            )
        return value

    def first(self, names: list[str], shape: tuple[int, ...], why: str) -> np.ndarray:
        """The first of several names present (tied weights are saved under one of them)."""
        for name in names:
            key = name if name == "lm_head.weight" else self.prefix + name
            if key in self.tensors:
                return self.get(name, shape, why)
        return self.get(names[0], shape, why)

    def has(self, name: str) -> bool:
        """Whether a tensor (named as in get) is present."""
        return (name if name == "final_logits_bias" else self.prefix + name) in self.tensors


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ValueError(
            f'{path}: reading safetensors needs the safetensors package: pip install -e ".[hf]"'
        ) from e
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own SafetensorError for bad files
        raise ValueError(f"{path}: cannot be read as safetensors ({e})") from e


def _load_pytorch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f'{path}: reading it needs torch: pip install -e ".[hf]"') from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    except Exception as e:  # torch raises RuntimeError, pickle errors, ... for bad files
        raise ValueError(f"{path}: cannot be read as PyTorch weights ({e})") from e


def _read_params(
    w: _WeightReader, marian: dict[str, Any], config: ModelConfig, order: np.ndarray
) -> tuple[dict[str, Any], np.ndarray]:
    D, F, V = config.d_model, config.d_ff, config.vocab_size
    H, K = config.num_heads, config.head_dim
    inv = np.argsort(_halves(D))  # our channel i is Marian's channel inv[i]

    def into(W: np.ndarray) -> np.ndarray:  # [out, D] torch weight -> [D, out], ours
        return W.T[inv]

    def out_of(W: np.ndarray) -> np.ndarray:  # [D, in] torch weight -> [in, D], ours
        return W.T[:, inv]

    def attention(prefix: str) -> dict[str, Any]:
        why = f"a {prefix} attention projection"

        def heads(name: str) -> dict[str, np.ndarray]:
            W = w.get(f"{prefix}.{name}_proj.weight", (H * K, D), why)
            b = w.get(f"{prefix}.{name}_proj.bias", (H * K,), why)
            return {"kernel": into(W).reshape(D, H, K), "bias": b.reshape(H, K)}

        W_out = w.get(f"{prefix}.out_proj.weight", (D, H * K), why)
        b_out = w.get(f"{prefix}.out_proj.bias", (D,), why)
        return {
            "query": heads("q"),
            "key": heads("k"),
            "value": heads("v"),
            "out": {"kernel": out_of(W_out).reshape(H, K, D), "bias": b_out[inv]},
        }

    def norm(prefix: str) -> dict[str, Any]:
        why = "a LayerNorm"
        return {
            "norm": {
                "layer_norm": {
                    "scale": w.get(f"{prefix}.weight", (D,), why)[inv],
                    "bias": w.get(f"{prefix}.bias", (D,), why)[inv],
                }
            }
        }

    def ffn(prefix: str) -> dict[str, Any]:
        why = "a feed-forward layer"
        return {
            "wi": {
                "kernel": into(w.get(f"{prefix}.fc1.weight", (F, D), why)),
                "bias": w.get(f"{prefix}.fc1.bias", (F,), why),
            },
            "wo": {
                "kernel": out_of(w.get(f"{prefix}.fc2.weight", (D, F), why)),
                "bias": w.get(f"{prefix}.fc2.bias", (D,), why)[inv],
            },
        }

    def table(names: list[str]) -> np.ndarray:
        return w.first(names, (V, D), "an embedding table")[order][:, inv]

    encoder: dict[str, Any] = {}
    for i in range(config.num_encoder_layers):
        p = f"encoder.layers.{i}"
        encoder[f"layer_{i}"] = {
            "self_attention": attention(f"{p}.self_attn"),
            "attention_block": norm(f"{p}.self_attn_layer_norm"),
            "ffn": ffn(p),
            "ffn_block": norm(f"{p}.final_layer_norm"),
        }
    decoder: dict[str, Any] = {}
    for i in range(config.num_decoder_layers):
        p = f"decoder.layers.{i}"
        decoder[f"layer_{i}"] = {
            "self_attention": attention(f"{p}.self_attn"),
            "self_attention_block": norm(f"{p}.self_attn_layer_norm"),
            "cross_attention": attention(f"{p}.encoder_attn"),
            "cross_attention_block": norm(f"{p}.encoder_attn_layer_norm"),
            "ffn": ffn(p),
            "ffn_block": norm(f"{p}.final_layer_norm"),
        }
    params: dict[str, Any] = {"encoder": encoder, "decoder": decoder}
    if config.embedding_sharing == "all":
        names = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
        params["embedding"] = {"embedding": table([*names, "lm_head.weight"])}
    else:
        params["embedding"] = {"embedding": table(["encoder.embed_tokens.weight"])}
        decoder_names = ["decoder.embed_tokens.weight"]
        if config.embedding_sharing == "target":
            decoder_names.append("lm_head.weight")
        params["target_embedding"] = {"embedding": table(decoder_names)}
    if config.embedding_sharing == "none":
        head = w.get("lm_head.weight", (V, D), "the untied output projection")
        decoder["logits"] = {"kernel": head[order].T[inv]}
    bias = np.zeros((V,), np.float32)
    if w.has("final_logits_bias"):
        bias = w.get("final_logits_bias", (1, V), "the logits bias")[0][order]
    return params, bias


# -- writing ------------------------------------------------------------------------------------


def unsupported(config: ModelConfig) -> list[str]:
    """'field=value (why)' for every setting a MarianMTModel cannot express; empty if none."""
    return fields.unsupported(config, _MARIAN_RULES, "MarianMTModel")


# What a MarianMTModel expresses, per ModelConfig field (an allow-list: a field missing here,
# one added to ModelConfig later included, is refused until it is mapped).
_MARIAN_RULES: dict[str, fields.Rule] = {
    **{
        field: fields.any_value()
        for field in (
            "vocab_size",
            "num_heads",
            "d_ff",
            "num_encoder_layers",
            "num_decoder_layers",
            "max_len",  # max_position_embeddings
            "layer_norm_epsilon",  # PyTorch's 1e-5 in the folder; a difference is logged
            "decoder_start_id",
            "embedding_sharing",  # share_encoder_decoder_embeddings, tie_word_embeddings
            "logits_bias",  # final_logits_bias
            "scan_layers",  # parameters are unstacked first
            "rope_theta",  # read only by position_encoding="rope", which is refused below
            *fields.MOE_KNOBS,
        )
    },
    "moe_num_experts": fields.dense_ffn("MarianMTModel"),
    "quantization": fields.float_weights("MarianMTModel"),
    "attention_window": (
        lambda c: c.attention_window is None,
        "MarianMTModel has no sliding-window attention",
    ),
    "d_model": (lambda c: c.d_model % 2 == 0, "the sinusoid needs an even d_model"),
    "num_kv_heads": (
        lambda c: c.kv_heads == c.num_heads,
        "MarianMTModel has no grouped-query attention",
    ),
    "norm_position": (lambda c: c.norm_position == "post", "MarianMTModel is post-LN"),
    "norm_type": (lambda c: c.norm_type == "layernorm", "MarianMTModel has LayerNorm only"),
    "position_encoding": (
        lambda c: c.position_encoding == "sinusoidal",
        "MarianMTModel has sinusoids only",
    ),
    "feed_forward": (
        lambda c: c.feed_forward in _EXPORTED_ACTIVATIONS,
        "no gated FFN in MarianMTModel",
    ),
    "use_bias": (lambda c: c.use_bias, "MarianMTModel's projections all have biases"),
}


def marian_files(
    config: ModelConfig,
    params: dict[str, Any],
    tokenizer: Tokenizer,
    spm_models: tuple[bytes, bytes],
) -> tuple[dict[str, str], dict[str, np.ndarray], tuple[bytes, bytes]]:
    """The JSON files (name -> text), tensors and (source, target) spm bytes of a Marian folder."""
    problems = unsupported(config)
    if problems:
        raise ValueError(
            "a MarianMTModel cannot express this model (model_config.json): ModelConfig."
            + "; ModelConfig.".join(problems)
        )
    ours = vocabulary(tokenizer, config.vocab_size)
    order = export_order(config)
    ids = {name: int(np.flatnonzero(order == i)[0]) for name, i in _SPECIAL.items()}
    ids["decoder_start"] = int(np.flatnonzero(order == config.decoder_start_id)[0])
    files = {
        CONFIG: _dumps(_marian_config(config, ids)),
        GENERATION_CONFIG: _dumps(_generation_config(config, ids)),
        TOKENIZER_CONFIG: _dumps(
            {
                "tokenizer_class": "MarianTokenizer",
                "unk_token": ours[UNK_ID],
                "eos_token": ours[EOS_ID],
                "pad_token": ours[PAD_ID],
                "model_max_length": config.max_len,
                "separate_vocabs": False,
            }
        ),
        VOCAB: _dumps({ours[i]: m for m, i in enumerate(order)}),
    }
    return files, _tensors(config, params, order), spm_models


_SPECIAL = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}


def export_order(config: ModelConfig) -> np.ndarray:
    """The exported folder's id m is our id export_order[m].

    Models imported from Marian (they start the decoder from PAD) go back in Marian's layout,
    eos 0, unk 1, ..., pad last, so a fine-tuned OPUS-MT model keeps its original ids (and the
    tools that assume that layout, such as CTranslate2's converter, read it). Ours keep theirs.
    """
    V = config.vocab_size
    if config.decoder_start_id != PAD_ID:
        return np.arange(V)
    return np.asarray([EOS_ID, UNK_ID, *range(UNK_ID + 1, V), PAD_ID])


def spm_models_of(tokenizer: Tokenizer) -> tuple[bytes, bytes]:
    """The (source, target) sentencepiece models a tokenizer cuts text with, serialized."""
    if isinstance(tokenizer, VocabTokenizer):
        return tokenizer.source_processor.serialized_model_proto(), (
            tokenizer.processor.serialized_model_proto()
        )
    proto = tokenizer.processor.serialized_model_proto()
    return proto, proto


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _marian_config(config: ModelConfig, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "vocab_size": config.vocab_size,
        "decoder_vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "encoder_layers": config.num_encoder_layers,
        "decoder_layers": config.num_decoder_layers,
        "encoder_attention_heads": config.num_heads,
        "decoder_attention_heads": config.num_heads,
        "encoder_ffn_dim": config.d_ff,
        "decoder_ffn_dim": config.d_ff,
        "activation_function": _EXPORTED_ACTIVATIONS[config.feed_forward],
        "max_position_embeddings": config.max_len,
        "dropout": config.dropout_rate,
        "attention_dropout": config.attention_dropout_rate,
        "activation_dropout": config.relu_dropout_rate,
        "scale_embedding": True,
        "pad_token_id": ids["pad"],
        "eos_token_id": ids["eos"],
        "forced_eos_token_id": ids["eos"],
        "decoder_start_token_id": ids["decoder_start"],
        "share_encoder_decoder_embeddings": config.embedding_sharing == "all",
        "tie_word_embeddings": config.embedding_sharing != "none",
        "is_encoder_decoder": True,
    }


def _generation_config(config: ModelConfig, ids: dict[str, int]) -> dict[str, Any]:
    # Our decoders never emit PAD or the start token; generate() then picks what ours picks.
    banned = sorted({ids["pad"], ids["decoder_start"]})
    return {
        "decoder_start_token_id": ids["decoder_start"],
        "eos_token_id": ids["eos"],
        "forced_eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "bad_words_ids": [[i] for i in banned],
        "max_length": config.max_len,
    }


def _tensors(
    config: ModelConfig, params: dict[str, Any], order: np.ndarray
) -> dict[str, np.ndarray]:
    D = config.d_model
    P = _halves(D)  # Marian's channel c is our channel P[c]

    def f32(x: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x, np.float32))

    def into(K_DxO: Any) -> np.ndarray:  # ours [D, out] -> torch [out, D]
        return f32(np.asarray(K_DxO).reshape(D, -1)[P].T)

    def out_of(K_IxD: Any) -> np.ndarray:  # ours [in, D] -> torch [D, in]
        return f32(np.asarray(K_IxD).reshape(-1, D)[:, P].T)

    out: dict[str, np.ndarray] = {}

    def attention(prefix: str, tree: dict[str, Any]) -> None:
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{prefix}.{theirs}_proj.weight"] = into(tree[ours]["kernel"])
            out[f"{prefix}.{theirs}_proj.bias"] = f32(np.asarray(tree[ours]["bias"]).reshape(-1))
        out[f"{prefix}.out_proj.weight"] = out_of(tree["out"]["kernel"])
        out[f"{prefix}.out_proj.bias"] = f32(np.asarray(tree["out"]["bias"])[P])

    def norm(prefix: str, tree: dict[str, Any]) -> None:
        out[f"{prefix}.weight"] = f32(np.asarray(tree["norm"]["layer_norm"]["scale"])[P])
        out[f"{prefix}.bias"] = f32(np.asarray(tree["norm"]["layer_norm"]["bias"])[P])

    def ffn(prefix: str, tree: dict[str, Any]) -> None:
        out[f"{prefix}.fc1.weight"] = into(tree["wi"]["kernel"])
        out[f"{prefix}.fc1.bias"] = f32(tree["wi"]["bias"])
        out[f"{prefix}.fc2.weight"] = out_of(tree["wo"]["kernel"])
        out[f"{prefix}.fc2.bias"] = f32(np.asarray(tree["wo"]["bias"])[P])

    for i in range(config.num_encoder_layers):
        tree, p = params["encoder"][f"layer_{i}"], f"model.encoder.layers.{i}"
        attention(f"{p}.self_attn", tree["self_attention"])
        norm(f"{p}.self_attn_layer_norm", tree["attention_block"])
        ffn(p, tree["ffn"])
        norm(f"{p}.final_layer_norm", tree["ffn_block"])
    for i in range(config.num_decoder_layers):
        tree, p = params["decoder"][f"layer_{i}"], f"model.decoder.layers.{i}"
        attention(f"{p}.self_attn", tree["self_attention"])
        norm(f"{p}.self_attn_layer_norm", tree["self_attention_block"])
        attention(f"{p}.encoder_attn", tree["cross_attention"])
        norm(f"{p}.encoder_attn_layer_norm", tree["cross_attention_block"])
        ffn(p, tree["ffn"])
        norm(f"{p}.final_layer_norm", tree["ffn_block"])
    source = f32(np.asarray(params["embedding"]["embedding"])[order][:, P])
    if config.embedding_sharing == "all":
        out["model.shared.weight"] = source
        out["model.encoder.embed_tokens.weight"] = source
        out["model.decoder.embed_tokens.weight"] = source
        out["lm_head.weight"] = source
    else:
        target = f32(np.asarray(params["target_embedding"]["embedding"])[order][:, P])
        out["model.encoder.embed_tokens.weight"] = source
        out["model.decoder.embed_tokens.weight"] = target
        out["lm_head.weight"] = target
        if config.embedding_sharing == "none":
            kernel = np.asarray(params["decoder"]["logits"]["kernel"])
            out["lm_head.weight"] = f32(kernel[P][:, order].T)
    bias = np.zeros((config.vocab_size,), np.float32)
    if config.logits_bias:
        bias = np.asarray(params["decoder"]["logits_bias"])
    out["final_logits_bias"] = f32(bias[order])[None]
    return out
