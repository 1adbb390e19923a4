"""Our parameters as a CTranslate2 model directory (`python -m transformer_jax.export`).

CTranslate2 describes a Transformer by a `TransformerSpec` whose variables are numpy arrays in
its own layout: every linear weight is [out, in], self-attention projects queries, keys and
values with one fused [3 H K, D] matrix, cross-attention keys and values with one [2 G K, D].
The mapping below is written once per kind of layer; `supported` refuses, naming the field,
every ModelConfig value it does not know how to express. Position encodings are exported as an
explicit table, so CTranslate2 adds exactly our interleaved sinusoid (or our learned table).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transformer_jax.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ModelConfig
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.interop import fields

# Written into an exported folder beside CTranslate2's own files.
EXPORT_META = "transformer_jax.json"
EXPORT_TOKENIZER = "tokenizer.model"

# What CTranslate2 can express, per ModelConfig field: the values we export. A field missing
# here, or a value outside its set, is refused (a new switch must be mapped before it exports).
_EXPRESSIBLE: dict[str, set[object]] = {
    "norm_position": {"post", "pre"},
    "norm_type": {"layernorm", "rmsnorm"},
    # rope and alibi act inside attention, which TransformerSpec's encoder cannot; "none" is
    # a table of zeros.
    "position_encoding": {"sinusoidal", "learned", "none"},
    "attention_window": {None},  # no sliding window in TransformerSpec's encoder
    "feed_forward": {"relu", "gelu", "swish", "swiglu"},
    "embedding_sharing": {"all", "target", "none"},
    "use_bias": {True, False},
    "logits_bias": {True, False},
    "scan_layers": {True, False},  # parameters are unstacked first
}
# Fields that size the model; every value is expressible.
_SHAPES = (
    "vocab_size",
    "d_model",
    "num_heads",
    "num_kv_heads",
    "d_ff",
    "num_encoder_layers",
    "num_decoder_layers",
    "max_len",
    "layer_norm_epsilon",
    "decoder_start_id",  # exported as CTranslate2's decoder_start_token
    "rope_theta",  # read only by position_encoding="rope", which is refused above
)


def unsupported(config: ModelConfig) -> list[str]:
    """'field=value (why)' for every setting CTranslate2 cannot express; empty if none."""
    rules = {field: fields.any_value() for field in (*_SHAPES, *fields.MOE_KNOBS)}
    rules["moe_num_experts"] = fields.dense_ffn("CTranslate2")
    rules["quantization"] = fields.float_weights("CTranslate2")
    for field, values in _EXPRESSIBLE.items():
        rules[field] = fields.one_of(field, values, "CTranslate2")
    return fields.unsupported(config, rules, "CTranslate2")


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """One token string per embedding row: the sentencepiece pieces, then unique padding names.

    The model's vocabulary may be larger than the tokenizer's (padded for sharding); CTranslate2
    needs a token for every row, and rows past the pieces are never produced by our tokenizer.
    """
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    taken = set(pieces)
    extra = []
    for row in range(tokenizer.vocab_size, vocab_size):
        name = f"<unused{row}>"
        while name in taken:
            name = f"<{name}>"
        taken.add(name)
        extra.append(name)
    return pieces + extra


def special_tokens(tokens: list[str]) -> dict[str, str]:
    """The pieces of our fixed special ids, as CTranslate2's config names them."""
    return {
        "unk_token": tokens[UNK_ID],
        "bos_token": tokens[BOS_ID],
        "eos_token": tokens[EOS_ID],
        "pad_token": tokens[PAD_ID],
    }


def build_spec(config: ModelConfig, params: Any, tokenizer: Tokenizer) -> Any:
    """The CTranslate2 TransformerSpec holding these parameters (numpy, float32)."""
    from ctranslate2.specs import common_spec, transformer_spec

    from transformer_jax.model import unstack_layer_params

    problems = unsupported(config)
    if problems:
        raise ValueError(
            "CTranslate2 cannot express this model: ModelConfig." + "; ModelConfig.".join(problems)
        )
    params = _host_tree(params)
    if config.scan_layers:
        params = unstack_layer_params(params)
    activation = {
        "relu": common_spec.Activation.RELU,
        # flax's nn.gelu is the tanh approximation by default.
        "gelu": common_spec.Activation.GELUTanh,
        "swish": common_spec.Activation.SWISH,
        "swiglu": common_spec.Activation.SWISH,
    }[config.feed_forward]
    kv_heads = None if config.num_kv_heads in (None, config.num_heads) else config.num_kv_heads
    common = {
        "pre_norm": config.norm_position == "pre",
        "activation": activation,
        "ffn_glu": config.feed_forward == "swiglu",
        "rms_norm": config.norm_type == "rmsnorm",
        "num_heads_kv": kv_heads,
    }
    encoder = transformer_spec.TransformerEncoderSpec(
        config.num_encoder_layers, config.num_heads, **common
    )
    decoder = transformer_spec.TransformerDecoderSpec(
        config.num_decoder_layers, config.num_heads, **common
    )
    spec = transformer_spec.TransformerSpec(encoder, decoder)
    _fill(spec, config, params)
    tokens = vocabulary(tokenizer, config.vocab_size)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    for name, value in special_tokens(tokens).items():
        if name != "pad_token":  # CTranslate2 pads with its own id 0 handling; ours is id 0 too
            setattr(spec.config, name, value)
    spec.config.decoder_start_token = tokens[config.decoder_start_id]
    # The model was trained on sources ending in EOS: the folder says so itself, as
    # CTranslate2's own Marian and fairseq converters do, so that any program serving it
    # (a CTranslate2 server, a user's script) feeds the sources the model knows.
    spec.config.add_source_eos = True
    spec.config.add_source_bos = False
    spec.config.layer_norm_epsilon = config.layer_norm_epsilon
    return spec


def _host_tree(params: Any) -> Any:
    import jax

    # Copies: CTranslate2 quantizes in place, and arrays viewed from jax are read-only.
    return jax.tree.map(lambda x: np.array(x, np.float32), params)


def _fill(spec: Any, config: ModelConfig, params: dict) -> None:
    source_table = params["embedding"]["embedding"]
    target_table = (
        source_table
        if config.embedding_sharing == "all"
        else params["target_embedding"]["embedding"]
    )
    for side, stack, table in (
        (spec.encoder, params["encoder"], source_table),
        (spec.decoder, params["decoder"], target_table),
    ):
        embeddings = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        embeddings.weight = table
        side.scale_embeddings = True  # x * sqrt(d_model), section 3.4
        side.position_encodings.encodings = _position_table(config, stack)
        if config.norm_position == "pre":
            _norm(side.layer_norm, stack["final_norm"], config)
    for i, layer in enumerate(spec.encoder.layer):
        tree = params["encoder"][f"layer_{i}"]
        _self_attention(layer.self_attention, tree["self_attention"], config)
        _norm(layer.self_attention.layer_norm, tree["attention_block"]["norm"], config)
        _ffn(layer.ffn, tree["ffn"], config)
        _norm(layer.ffn.layer_norm, tree["ffn_block"]["norm"], config)
    for i, layer in enumerate(spec.decoder.layer):
        tree = params["decoder"][f"layer_{i}"]
        _self_attention(layer.self_attention, tree["self_attention"], config)
        _norm(layer.self_attention.layer_norm, tree["self_attention_block"]["norm"], config)
        _cross_attention(layer.attention, tree["cross_attention"], config)
        _norm(layer.attention.layer_norm, tree["cross_attention_block"]["norm"], config)
        _ffn(layer.ffn, tree["ffn"], config)
        _norm(layer.ffn.layer_norm, tree["ffn_block"]["norm"], config)
    if config.embedding_sharing == "none":
        spec.decoder.projection.weight = params["decoder"]["logits"]["kernel"].T
    else:
        spec.decoder.projection.weight = target_table
    if config.logits_bias:
        spec.decoder.projection.bias = params["decoder"]["logits_bias"]


def _position_table(config: ModelConfig, stack: dict) -> np.ndarray:
    if config.position_encoding == "learned":
        return stack["position_embedding"]["position_embedding"]
    if config.position_encoding == "none":
        return np.zeros((config.max_len, config.d_model), np.float32)
    import jax.numpy as jnp

    from transformer_jax.model.layers import sinusoidal_encoding

    positions = jnp.arange(config.max_len, dtype=jnp.int32)[None]
    return np.asarray(sinusoidal_encoding(positions, config.d_model)[0], np.float32)


def _norm(spec: Any, tree: dict, config: ModelConfig) -> None:
    if config.norm_type == "rmsnorm":
        spec.gamma = tree["rms_norm"]["scale"]
        return
    spec.gamma = tree["layer_norm"]["scale"]
    spec.beta = tree["layer_norm"]["bias"]


def _heads(tree: dict, config: ModelConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """A [D, N, K] head projection as a [N K, D] linear weight (and its [N K] bias)."""
    kernel = tree["kernel"]
    weight = kernel.reshape(kernel.shape[0], -1).T
    bias = tree["bias"].reshape(-1) if config.use_bias else None
    return weight, bias


def _linear(spec: Any, weight: np.ndarray, bias: np.ndarray | None) -> None:
    spec.weight = np.ascontiguousarray(weight)
    if bias is not None:
        spec.bias = bias


def _concat(parts: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[Any, Any]:
    weight = np.concatenate([w for w, _ in parts], axis=0)
    biases = [b for _, b in parts if b is not None]
    return weight, np.concatenate(biases) if biases else None


def _output(spec: Any, tree: dict, config: ModelConfig) -> None:
    kernel = tree["kernel"]  # [H, K, D]
    bias = tree["bias"] if config.use_bias else None
    _linear(spec, kernel.reshape(-1, kernel.shape[-1]).T, bias)


def _self_attention(spec: Any, tree: dict, config: ModelConfig) -> None:
    qkv = [_heads(tree[name], config) for name in ("query", "key", "value")]
    _linear(spec.linear[0], *_concat(qkv))
    _output(spec.linear[1], tree["out"], config)


def _cross_attention(spec: Any, tree: dict, config: ModelConfig) -> None:
    _linear(spec.linear[0], *_heads(tree["query"], config))
    _linear(spec.linear[1], *_concat([_heads(tree[n], config) for n in ("key", "value")]))
    _output(spec.linear[2], tree["out"], config)


def _ffn(spec: Any, tree: dict, config: ModelConfig) -> None:
    def dense(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        return tree[name]["kernel"].T, tree[name]["bias"] if config.use_bias else None

    if config.feed_forward == "swiglu":
        # Ours: silu(x W_gate) * (x W_i); CTranslate2: act(linear_0(x)) * linear_0_noact(x).
        _linear(spec.linear_0, *dense("wi_gate"))
        _linear(spec.linear_0_noact, *dense("wi"))
    else:
        _linear(spec.linear_0, *dense("wi"))
    _linear(spec.linear_1, *dense("wo"))
