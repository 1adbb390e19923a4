"""Model configuration: one frozen, validated dataclass and the paper's presets.

Special token ids are fixed here, once, for the tokenizer, the model and the decoders:
PAD_ID 0 (padding, never attended), EOS_ID 1 (end of sentence, appended to every source and
target), UNK_ID 2 (unknown piece), BOS_ID 3 (the decoder's start token, shifted in at the start
of every target segment).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, get_args, get_type_hints

from etils import epath

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = 3
NUM_RESERVED_IDS = 4

DType = Literal["float32", "bfloat16", "float16"]
NormPosition = Literal["post", "pre"]
NormType = Literal["layernorm", "rmsnorm"]
# sinusoidal and learned are added at the embedding; rope rotates queries and keys and alibi
# biases the scores, in self-attention; none is the bag-of-words control.
PositionEncoding = Literal["sinusoidal", "learned", "rope", "alibi", "none"]
# swish: silu(x W1 + b1) W2 + b2, not gated (Marian / OPUS-MT); swiglu is the gated form.
FeedForwardType = Literal["relu", "gelu", "swish", "swiglu"]
EmbeddingSharing = Literal["all", "target", "none"]
AttentionImpl = Literal["einsum", "dot_product", "splash"]
# How routed tokens reach their experts (model/moe.py): "einsum" dispatches into fixed-capacity
# expert buffers (GShard; shards over the expert mesh axis), "ragged" sorts them by expert and
# runs grouped matmuls (jax.lax.ragged_dot; dropless).
MoEDispatch = Literal["einsum", "ragged"]
# Decoding precision (model/quant.py): "int8" runs every projection, FFN and the output layer
# (and the embedding it shares) as int8 x int8 -> int32 products; set by load(quantization=).
Quantization = Literal["none", "int8"]
# The decoding cache's storage: "float" keeps keys and values in the compute dtype, "int8"
# stores them as int8 with one float32 scale per token and head.
KVCacheType = Literal["float", "int8"]
PresetName = Literal["tiny", "base", "big"]
Remat = Literal["none", "full", "dots"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the encoder-decoder Transformer; defaults are the paper's base model."""

    vocab_size: int = 37000
    d_model: int = 512
    num_heads: int = 8
    # Key/value heads; fewer than num_heads gives grouped-query (1 gives multi-query) attention.
    num_kv_heads: int | None = None
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    # Residual dropout (paper section 5.4): sublayer outputs and embedding + position sums.
    dropout_rate: float = 0.1
    # On attention probabilities (tensor2tensor has it; the paper does not). einsum only.
    attention_dropout_rate: float = 0.0
    # On the FFN hidden activation (tensor2tensor's relu_dropout; not in the paper).
    relu_dropout_rate: float = 0.0
    # Largest position id the model supports (sinusoid table / learned table size).
    max_len: int = 512
    embedding_sharing: EmbeddingSharing = "all"
    norm_position: NormPosition = "post"
    norm_type: NormType = "layernorm"
    layer_norm_epsilon: float = 1e-6
    position_encoding: PositionEncoding = "sinusoidal"
    # rope only: the base of the rotation frequencies, theta^(-2i/d_k) (RoFormer's 10000).
    rope_theta: float = 10000.0
    # Sliding-window self-attention: a decoder position sees itself and the W - 1 before it,
    # an encoder position those within W - 1 either side; None: the whole row.
    attention_window: int | None = None
    feed_forward: FeedForwardType = "relu"
    # Mixture of experts (model/moe.py, docs/model.md). 0: the dense FFN in every layer.
    # Otherwise every moe_encoder_every-th encoder layer and moe_decoder_every-th decoder layer,
    # counting from 1 (fairseq's moe-freq; 0: none in that stack), sends each token to the
    # moe_experts_per_token of moe_num_experts expert FFNs its float32 router scores highest.
    moe_num_experts: int = 0
    moe_experts_per_token: int = 2
    moe_encoder_every: int = 2
    moe_decoder_every: int = 2
    # Slots per expert and row: ceil(k x row length x factor / experts), at most the row
    # length; a choice past them is dropped (the token keeps its residual), and counted.
    # Training uses moe_capacity_factor, evaluation and decoding moe_eval_capacity_factor.
    moe_capacity_factor: float = 1.25
    moe_eval_capacity_factor: float = 2.0
    # The experts' own FFN width and activation; None: d_ff and feed_forward.
    moe_d_ff: int | None = None
    moe_feed_forward: FeedForwardType | None = None
    # Auxiliary loss coefficients: Switch's load balancing (1e-2) and ST-MoE's router z-loss
    # (1e-3), summed over MoE layers into the training loss.
    moe_load_balance_loss: float = 1e-2
    moe_router_z_loss: float = 1e-3
    moe_dispatch: MoEDispatch = "einsum"
    # Biases on attention and FFN projections (the paper's count includes them).
    use_bias: bool = True
    # A bias on the pre-softmax projection (Marian's final_logits_bias; not in the paper).
    logits_bias: bool = False
    # The decoder's first input token. BOS_ID for our vocabularies; models imported from
    # Marian start from their pad piece, which the import renumbers to PAD_ID.
    decoder_start_id: int = BOS_ID
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    # The attention kernel (model/kernels.py): "einsum" everywhere, "dot_product"
    # (jax.nn.dot_product_attention), "splash" (Pallas splash attention on TPU; interpret mode
    # elsewhere).
    attention_impl: AttentionImpl = "einsum"
    # splash only: the kernel's query and key block (128 x a power of two); None picks 512.
    # A shorter row takes the largest of block, block / 2, ..., 128 that tiles it.
    splash_block_size: int | None = None
    # Rematerialize each layer in the backward pass: "full" keeps only layer inputs, "dots"
    # also keeps matmul outputs (recomputes the cheap elementwise work).
    remat: Remat = "none"
    # nn.scan over layers: one compiled layer body (compile time flat in depth); params get a
    # leading "layers" axis, so checkpoints differ in layout from unscanned ones.
    scan_layers: bool = False
    # Decoding only (docs/inference.md "int8"). Weights of an "int8" model are int8 with
    # per-output-channel scales, made from a float checkpoint by model.quant.quantize_params;
    # training refuses it. kv_cache="int8" changes the decoding cache alone.
    quantization: Quantization = "none"
    kv_cache: KVCacheType = "float"

    def __post_init__(self) -> None:
        _check_literals(self)
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            _require(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            _require(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("dropout_rate", "attention_dropout_rate", "relu_dropout_rate"):
            rate = getattr(self, name)
            _require(0.0 <= rate < 1.0, name, f"must be in [0, 1), got {rate}")
        _require(
            self.d_model % self.num_heads == 0,
            "d_model",
            f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}",
        )
        if self.num_kv_heads is not None:
            _require(self.num_kv_heads > 0, "num_kv_heads", "must be a positive integer")
            _require(
                self.num_heads % self.num_kv_heads == 0,
                "num_kv_heads",
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
            )
        _require(
            self.vocab_size > NUM_RESERVED_IDS,
            "vocab_size",
            f"must exceed the {NUM_RESERVED_IDS} reserved ids (pad, eos, unk, bos)",
        )
        _require(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be positive")
        _require(
            0 <= self.decoder_start_id < self.vocab_size and self.decoder_start_id != EOS_ID,
            "decoder_start_id",
            f"{self.decoder_start_id} must be a token id below vocab_size={self.vocab_size} "
            f"other than EOS ({EOS_ID})",
        )
        _require(
            not (self.attention_impl == "dot_product" and self.attention_dropout_rate > 0),
            "attention_dropout_rate",
            "jax.nn.dot_product_attention has no dropout; use attention_impl='einsum' or set 0",
        )
        _require(
            not (self.attention_impl == "splash" and self.attention_dropout_rate > 0),
            "attention_dropout_rate",
            "splash attention has no dropout on the probabilities; use attention_impl='einsum' "
            "or set 0",
        )
        _require(
            not (self.position_encoding == "alibi" and self.attention_impl == "splash"),
            "position_encoding",
            "'alibi' adds a bias to the scores, which attention_impl='splash' cannot take; use "
            "attention_impl='einsum' or 'dot_product', or position_encoding='rope'",
        )
        _require(
            self.position_encoding != "rope" or self.head_dim % 2 == 0,
            "position_encoding",
            f"'rope' rotates pairs of channels: head_dim={self.head_dim} must be even",
        )
        _require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        if self.attention_window is not None:
            _require(
                self.attention_window >= 1,
                "attention_window",
                f"must be at least 1 (or None), got {self.attention_window}",
            )
        if self.splash_block_size is not None:
            blocks = self.splash_block_size // 128
            _require(
                self.splash_block_size % 128 == 0 and blocks >= 1 and blocks & (blocks - 1) == 0,
                "splash_block_size",
                f"{self.splash_block_size} must be 128 times a power of two (128, 256, 512, ...): "
                "the kernel's lanes are 128 wide and shorter rows take halved blocks",
            )
        _require(self.param_dtype != "float16", "param_dtype", "float16 parameters are unsupported")
        self._check_moe()

    def _check_moe(self) -> None:
        _require(self.moe_num_experts >= 0, "moe_num_experts", "must be >= 0 (0: dense FFN)")
        if not self.moe_num_experts:
            return
        k, experts = self.moe_experts_per_token, self.moe_num_experts
        _require(
            1 <= k <= experts,
            "moe_experts_per_token",
            f"{k} experts per token needs 1 <= k <= moe_num_experts={experts}",
        )
        for name in ("moe_encoder_every", "moe_decoder_every"):
            _require(getattr(self, name) >= 0, name, "must be >= 0 (0: no MoE layer there)")
        for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
            value = getattr(self, name)
            _require(value > 0, name, f"must be > 0, got {value} (it sizes the expert buffers)")
        for name in ("moe_load_balance_loss", "moe_router_z_loss"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(
            not (self.moe_dispatch == "ragged" and self.relu_dropout_rate > 0),
            "relu_dropout_rate",
            "moe_dispatch='ragged' has no dropout on the experts' hidden units; set 0 or use "
            "moe_dispatch='einsum'",
        )
        if self.moe_d_ff is not None:
            _require(
                isinstance(self.moe_d_ff, int) and self.moe_d_ff > 0,
                "moe_d_ff",
                f"must be a positive integer (or None), got {self.moe_d_ff!r}",
            )
        if self.moe_feed_forward is not None:
            allowed = get_args(FeedForwardType)
            _require(
                self.moe_feed_forward in allowed,
                "moe_feed_forward",
                f"{self.moe_feed_forward!r} is not one of {list(allowed)} (or None)",
            )
        _require(
            bool(self.moe_layers("encoder") or self.moe_layers("decoder")),
            "moe_num_experts",
            f"{experts} experts but no layer uses them: moe_encoder_every="
            f"{self.moe_encoder_every} and moe_decoder_every={self.moe_decoder_every} select none",
        )
        if self.scan_layers:
            # nn.scan repeats one layer body, so the stack must be all MoE or all dense.
            for stack in ("encoder", "decoder"):
                every = getattr(self, f"moe_{stack}_every")
                _require(
                    every in (0, 1),
                    "scan_layers",
                    f"scans one layer body, so moe_{stack}_every={every} cannot alternate dense "
                    "and MoE layers; use 1 (every layer) or 0, or scan_layers=False",
                )

    def moe_layers(self, stack: Literal["encoder", "decoder"]) -> tuple[int, ...]:
        """0-based indices of the MoE layers in one stack (layer i when (i + 1) % every == 0)."""
        every = getattr(self, f"moe_{stack}_every")
        count = getattr(self, f"num_{stack}_layers")
        if not self.moe_num_experts or not every:
            return ()
        return tuple(i for i in range(count) if (i + 1) % every == 0)

    @property
    def expert_d_ff(self) -> int:
        """The experts' hidden width (moe_d_ff, else d_ff)."""
        return self.moe_d_ff or self.d_ff

    @property
    def expert_feed_forward(self) -> str:
        """The experts' activation (moe_feed_forward, else feed_forward)."""
        return self.moe_feed_forward or self.feed_forward

    @property
    def head_dim(self) -> int:
        """d_k = d_v = d_model / num_heads."""
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads actually used."""
        return self.num_kv_heads or self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The paper's Table 3 models ('base', 'big') or a CPU-sized 'tiny', with overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"preset: unknown field(s) {sorted(unknown)} for ModelConfig")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in a workdir."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a dict, naming unknown fields and where they came from."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"{source}: unknown ModelConfig field(s) {sorted(unknown)}; "
                "was it written by a newer transformer-jax?"
            )
        return cls(**values)

    def save(self, path: epath.PathLike) -> None:
        """Write as JSON (the workdir's model_config.json)."""
        epath.Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: epath.PathLike) -> ModelConfig:
        """Read a JSON file written by save()."""
        try:
            values = json.loads(epath.Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); the model config is corrupt") from e
        return cls.from_dict(values, source=str(path))


PRESETS: dict[str, dict[str, Any]] = {
    # Table 3, "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1.
    "base": {},
    # Table 3, "big": N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (EN-DE).
    "big": {"d_model": 1024, "d_ff": 4096, "num_heads": 16, "dropout_rate": 0.3},
    # A CPU-sized model for the built-in corpus and tests.
    "tiny": {
        "vocab_size": 1024,
        "d_model": 128,
        "num_heads": 4,
        "d_ff": 512,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "dropout_rate": 0.1,
        "max_len": 128,  # the default run's rows are 64 tokens; decoding stays within 128
    },
}


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field}: {message}")


def _check_literals(config: ModelConfig) -> None:
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        allowed = get_args(hints[f.name])
        value = getattr(config, f.name)
        if allowed and all(isinstance(a, str) for a in allowed) and value not in allowed:
            raise ValueError(f"ModelConfig.{f.name}: {value!r} is not one of {list(allowed)}")
        if hints[f.name] is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"ModelConfig.{f.name}: expected an integer, got {value!r}")
