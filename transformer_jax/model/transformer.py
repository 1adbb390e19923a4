"""The encoder-decoder Transformer (section 3.1, Figure 1) as pure flax.linen modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import BOS_ID, PAD_ID, ModelConfig
from transformer_jax.model.attention import MultiHeadAttention
from transformer_jax.model.cache import DecoderSteps, StepMask
from transformer_jax.model.layers import (
    ACT_BLD,
    REPORTED,
    Dense,
    Embed,
    FeedForward,
    Norm,
    PositionEmbedding,
    dtype_of,
)
from transformer_jax.model.masks import AttentionMask
from transformer_jax.model.moe import MoEFeedForward

Array = jax.Array


class ResidualBlock(nn.Module):
    """Post-LN: Norm(x + Dropout(f(x))) as in section 3.1; pre-LN: x + Dropout(f(Norm(x)))."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x_BxLxD: Array, sublayer: Callable[[Array], Array], *, deterministic: bool
    ) -> Array:
        """Wrap one sublayer with dropout, the residual connection and normalization."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        if cfg.norm_position == "pre":
            y_BxLxD = sublayer(Norm(cfg, name="norm")(x_BxLxD))
            out_BxLxD = x_BxLxD + dropout(y_BxLxD, deterministic=deterministic)
        else:
            y_BxLxD = sublayer(x_BxLxD)
            out_BxLxD = Norm(cfg, name="norm")(
                x_BxLxD + dropout(y_BxLxD, deterministic=deterministic)
            )
        return nn.with_logical_constraint(out_BxLxD, ACT_BLD)


def feed_forward(config: ModelConfig, moe: bool, causal: bool = False) -> nn.Module:
    """The layer's FFN: the dense one, or experts (named 'moe') where config puts them."""
    if moe:
        return MoEFeedForward(config, causal=causal, name="moe")
    return FeedForward(config, name="ffn")


class EncoderLayer(nn.Module):
    """Self-attention then the feed-forward network, each in a residual block.

    Returns (output, None): the (carry, per-layer output) form nn.scan needs.
    """

    config: ModelConfig
    deterministic: bool = True
    moe: bool = False  # a mixture of experts in place of the dense FFN

    @nn.compact
    def __call__(
        self, x_BxSxD: Array, mask: AttentionMask, positions_BxS: Array
    ) -> tuple[Array, None]:
        """One of the N encoder layers."""
        cfg = self.config
        deterministic = self.deterministic
        attention = MultiHeadAttention(cfg, name="self_attention")
        ffn = feed_forward(cfg, self.moe)
        x_BxSxD = ResidualBlock(cfg, name="attention_block")(
            x_BxSxD,
            lambda h: attention(
                h, h, mask, deterministic=deterministic, positions_BxT=positions_BxS
            ),
            deterministic=deterministic,
        )
        out_BxSxD = ResidualBlock(cfg, name="ffn_block")(
            x_BxSxD,
            lambda h: ffn(h, mask.q_valid, deterministic=deterministic),
            deterministic=deterministic,
        )
        return out_BxSxD, None


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, then the FFN (section 3.1).

    Returns (output, None): the (carry, per-layer output) form nn.scan needs.
    """

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False
    moe: bool = False  # a mixture of experts in place of the dense FFN

    @nn.compact
    def __call__(
        self,
        y_BxTxD: Array,
        encoded_BxSxD: Array,
        self_mask: AttentionMask | StepMask,
        cross_mask: AttentionMask,
        positions_BxT: Array,
    ) -> tuple[Array, None]:
        """One of the N decoder layers."""
        cfg = self.config
        deterministic, decode = self.deterministic, self.decode
        self_attention = MultiHeadAttention(cfg, name="self_attention")
        cross_attention = MultiHeadAttention(cfg, is_cross_attention=True, name="cross_attention")
        ffn = feed_forward(cfg, self.moe, causal=True)
        # Rows per source (beams), read from the shapes: nn.scan passes no Python ints.
        copies = y_BxTxD.shape[0] // encoded_BxSxD.shape[0]
        y_BxTxD = ResidualBlock(cfg, name="self_attention_block")(
            y_BxTxD,
            lambda h: self_attention(
                h,
                h,
                self_mask,
                deterministic=deterministic,
                decode=decode,
                copies=copies,
                positions_BxT=positions_BxT,
            ),
            deterministic=deterministic,
        )
        y_BxTxD = ResidualBlock(cfg, name="cross_attention_block")(
            y_BxTxD,
            lambda h: cross_attention(
                h,
                encoded_BxSxD,
                cross_mask,
                deterministic=deterministic,
                decode=decode,
                copies=copies,
            ),
            deterministic=deterministic,
        )
        # Real target tokens (a decoding step's one token per row is always routed).
        valid_BxT = self_mask.q_valid if isinstance(self_mask, AttentionMask) else None
        out_BxTxD = ResidualBlock(cfg, name="ffn_block")(
            y_BxTxD,
            lambda h: ffn(h, valid_BxT, deterministic=deterministic),
            deterministic=deterministic,
        )
        return out_BxTxD, None


def _remat_policy(name: str) -> Any:
    """jax.checkpoint policy for config.remat ('dots': keep matmul outputs, recompute the rest)."""
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None  # "full": save nothing but the layer inputs


def run_layers(
    layer_cls: type[nn.Module],
    config: ModelConfig,
    num_layers: int,
    moe_layers: tuple[int, ...],
    carry: Array,
    *args: Any,
    **attributes: Any,
) -> Array:
    """Apply num_layers copies of a layer: a Python loop, or nn.scan; optionally rematerialized.

    Scanned parameters gain a leading 'layers' axis (logical name "layers"), and compile time
    stops growing with depth. Remat trades recomputation in the backward pass for memory.
    Layers whose index is in moe_layers get experts (scanning needs all or none of them:
    ModelConfig refuses the rest).
    """
    cls = layer_cls
    if config.remat != "none":
        # prevent_cse is only needed outside scan (scan already keeps the recomputation).
        cls = nn.remat(cls, policy=_remat_policy(config.remat), prevent_cse=not config.scan_layers)
    if config.scan_layers:
        scanned = nn.scan(
            cls,
            variable_axes={
                "params": 0,
                "cache": 0,
                "intermediates": 0,
                **{name: 0 for name in REPORTED},
            },
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        moe = bool(moe_layers)
        carry, _ = scanned(config, name="layers", moe=moe, **attributes)(carry, *args)
        return carry
    for i in range(num_layers):
        layer = cls(config, name=f"layer_{i}", moe=i in moe_layers, **attributes)
        carry, _ = layer(carry, *args)
    return carry


def default_positions(ids_BxL: Array) -> Array:
    """0, 1, 2, ... along each row (unpacked input)."""
    return jnp.broadcast_to(jnp.arange(ids_BxL.shape[1], dtype=jnp.int32), ids_BxL.shape)


def shift_right(targets_BxT: Array, positions_BxT: Array, start_id: int = BOS_ID) -> Array:
    """Decoder input: targets moved one step right, start_id wherever a segment starts.

    Restarting at every position 0 keeps packed rows from feeding one example's last token to
    the next example's first step. start_id is config.decoder_start_id (BOS for our models).
    """
    shifted_BxT = jnp.pad(targets_BxT, ((0, 0), (1, 0)), constant_values=start_id)[:, :-1]
    return jnp.where(positions_BxT == 0, start_id, shifted_BxT)


class Encoder(nn.Module):
    """Embedding, positions, dropout, then N encoder layers."""

    config: ModelConfig
    embedding: Embed

    @nn.compact
    def __call__(
        self,
        src_ids_BxS: Array,
        src_segment_ids_BxS: Array | None = None,
        src_positions_BxS: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Encode source ids into [B, S, D] (compute dtype)."""
        cfg = self.config
        if src_positions_BxS is None:
            src_positions_BxS = default_positions(src_ids_BxS)
        valid_BxS = src_ids_BxS != PAD_ID
        mask = AttentionMask(
            valid_BxS,
            valid_BxS,
            src_segment_ids_BxS,
            src_segment_ids_BxS,
            window=cfg.attention_window,
        )
        x_BxSxD = PositionEmbedding(cfg, name="position_embedding")(
            self.embedding(src_ids_BxS), src_positions_BxS
        )
        x_BxSxD = nn.Dropout(cfg.dropout_rate)(x_BxSxD, deterministic=deterministic)
        x_BxSxD = nn.with_logical_constraint(x_BxSxD, ACT_BLD)
        x_BxSxD = run_layers(
            EncoderLayer,
            cfg,
            cfg.num_encoder_layers,
            cfg.moe_layers("encoder"),
            x_BxSxD,
            mask,
            src_positions_BxS,
            deterministic=deterministic,
        )
        if cfg.norm_position == "pre":
            x_BxSxD = Norm(cfg, name="final_norm")(x_BxSxD)
        return x_BxSxD


class Decoder(nn.Module):
    """Target embedding, positions, N decoder layers, and the pre-softmax projection."""

    config: ModelConfig
    embedding: Embed
    output_embedding: Embed | None

    @nn.compact
    def __call__(
        self,
        encoded_BxSxD: Array,
        src_ids_BxS: Array,
        tgt_ids_BxT: Array,
        src_segment_ids_BxS: Array | None = None,
        tgt_segment_ids_BxT: Array | None = None,
        tgt_positions_BxT: Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Float32 logits [B, T, V] for every target position."""
        cfg = self.config
        src_valid_BxS = src_ids_BxS != PAD_ID
        copies = tgt_ids_BxT.shape[0] // src_ids_BxS.shape[0]
        if tgt_ids_BxT.shape[0] != copies * src_ids_BxS.shape[0] or (copies > 1 and not decode):
            raise ValueError(
                f"decoder: {tgt_ids_BxT.shape[0]} target rows for {src_ids_BxS.shape[0]} sources; "
                "training takes one target per source, decoding a multiple (beams) of them"
            )
        steps = DecoderSteps(self, cfg.attention_window)
        self_mask: AttentionMask | StepMask
        if decode and steps.stepping:
            # One step per call: tgt_ids holds the previous output token, no shift needed.
            index, self_mask = steps.step(tgt_ids_BxT.shape[0], copies)
            tgt_positions_BxT = jnp.full(tgt_ids_BxT.shape, index, jnp.int32)
            decoder_input_BxT = tgt_ids_BxT
            # A source's `copies` rows read its memory as one query row.
            cross_mask = AttentionMask(
                jnp.ones((src_valid_BxS.shape[0], copies), bool), src_valid_BxS
            )
        else:
            if decode:
                steps.create(*tgt_ids_BxT.shape)
            if tgt_positions_BxT is None:
                tgt_positions_BxT = default_positions(tgt_ids_BxT)
            decoder_input_BxT = shift_right(tgt_ids_BxT, tgt_positions_BxT, cfg.decoder_start_id)
            # Validity follows the targets: position t predicts target t from targets < t.
            tgt_valid_BxT = tgt_ids_BxT != PAD_ID
            self_mask = AttentionMask(
                tgt_valid_BxT,
                tgt_valid_BxT,
                tgt_segment_ids_BxT,
                tgt_segment_ids_BxT,
                causal=True,
                window=cfg.attention_window,
            )
            # A source's `copies` rows read its memory as one query row (copies is 1 in training).
            sources = src_valid_BxS.shape[0]
            cross_mask = AttentionMask(
                tgt_valid_BxT.reshape(sources, -1),
                src_valid_BxS,
                None if tgt_segment_ids_BxT is None else tgt_segment_ids_BxT.reshape(sources, -1),
                src_segment_ids_BxS,
            )
        y_BxTxD = PositionEmbedding(cfg, name="position_embedding")(
            self.embedding(decoder_input_BxT), tgt_positions_BxT
        )
        y_BxTxD = nn.Dropout(cfg.dropout_rate)(y_BxTxD, deterministic=deterministic)
        y_BxTxD = nn.with_logical_constraint(y_BxTxD, ACT_BLD)
        y_BxTxD = run_layers(
            DecoderLayer,
            cfg,
            cfg.num_decoder_layers,
            cfg.moe_layers("decoder"),
            y_BxTxD,
            encoded_BxSxD,
            self_mask,
            cross_mask,
            tgt_positions_BxT,
            deterministic=deterministic,
            decode=decode,
        )
        if cfg.norm_position == "pre":
            y_BxTxD = Norm(cfg, name="final_norm")(y_BxTxD)
        if self.output_embedding is not None:
            logits_BxTxV = self.output_embedding.attend(y_BxTxD)
        else:
            logits_BxTxV = Dense(
                cfg,
                cfg.vocab_size,
                ("embed", "vocab"),
                kernel_init=nn.initializers.normal(cfg.d_model**-0.5),
                use_bias=False,
                name="logits",
            )(y_BxTxD).astype(jnp.float32)
        if cfg.logits_bias:
            bias_V = self.param(
                "logits_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                (cfg.vocab_size,),
                dtype_of(cfg.param_dtype),
            )
            logits_BxTxV = logits_BxTxV + jnp.asarray(bias_V, jnp.float32)
        return logits_BxTxV


class Transformer(nn.Module):
    """Encoder-decoder Transformer: apply(variables, src_ids, tgt_ids) -> float32 logits.

    tgt_ids are the targets (ending in EOS); they are shifted right inside, BOS first. For
    packed rows pass segment ids (1, 2, ...; 0 for padding) and positions restarting at 0.
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.embedding = Embed(cfg)
        # "all": one matrix for source, target and pre-softmax (section 3.4).
        tgt_embedding = self.embedding
        if cfg.embedding_sharing != "all":
            self.target_embedding = Embed(cfg)
            tgt_embedding = self.target_embedding
        output_embedding = None if cfg.embedding_sharing == "none" else tgt_embedding
        self.encoder = Encoder(cfg, embedding=self.embedding)
        self.decoder = Decoder(cfg, embedding=tgt_embedding, output_embedding=output_embedding)

    def __call__(
        self,
        src_ids_BxS: Array,
        tgt_ids_BxT: Array,
        src_segment_ids_BxS: Array | None = None,
        tgt_segment_ids_BxT: Array | None = None,
        src_positions_BxS: Array | None = None,
        tgt_positions_BxT: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Teacher-forced logits [B, T, V] in float32."""
        encoded_BxSxD = self.encode(
            src_ids_BxS, src_segment_ids_BxS, src_positions_BxS, deterministic=deterministic
        )
        return self.decode(
            encoded_BxSxD,
            src_ids_BxS,
            tgt_ids_BxT,
            src_segment_ids_BxS,
            tgt_segment_ids_BxT,
            tgt_positions_BxT,
            deterministic=deterministic,
        )

    def encode(
        self,
        src_ids_BxS: Array,
        src_segment_ids_BxS: Array | None = None,
        src_positions_BxS: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Run the encoder once: [B, S] ids -> [B, S, D]."""
        return self.encoder(
            src_ids_BxS, src_segment_ids_BxS, src_positions_BxS, deterministic=deterministic
        )

    def decode(
        self,
        encoded_BxSxD: Array,
        src_ids_BxS: Array,
        tgt_ids_BxT: Array,
        src_segment_ids_BxS: Array | None = None,
        tgt_segment_ids_BxT: Array | None = None,
        tgt_positions_BxT: Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Logits from encoder output; decode=True uses and updates the 'cache' collection.

        Incremental decoding: first call with decode=True, mutable=["cache"] and a target of the
        maximum output length (any ids) to size the cache and project the encoder output once;
        then call once per step with tgt_ids [B, 1] = the previous token (BOS first).
        When decoding, tgt_ids may hold k rows per source (beam search's hypotheses, rows
        b * k .. b * k + k - 1 for source b): the encoder output then stays one row per source.
        """
        return self.decoder(
            encoded_BxSxD,
            src_ids_BxS,
            tgt_ids_BxT,
            src_segment_ids_BxS,
            tgt_segment_ids_BxT,
            tgt_positions_BxT,
            deterministic=deterministic,
            decode=decode,
        )


def stack_layer_params(params: dict) -> dict:
    """Convert unscanned params (layer_0, layer_1, ...) to the scan_layers=True layout."""
    out = dict(params)
    for stack in ("encoder", "decoder"):
        tree = params[stack]
        names = sorted((k for k in tree if k.startswith("layer_")), key=lambda k: int(k[6:]))
        rest = {k: v for k, v in tree.items() if not k.startswith("layer_")}
        out[stack] = {
            **rest,
            "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[k] for k in names]),
        }
    return out


def unstack_layer_params(params: dict) -> dict:
    """Convert scan_layers=True params (a stacked 'layers' tree) back to layer_0, layer_1, ..."""
    out = dict(params)
    for stack in ("encoder", "decoder"):
        tree = dict(params[stack])
        stacked = tree.pop("layers")
        count = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(count):
            tree[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        out[stack] = tree
    return out
