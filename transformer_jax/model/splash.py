"""attention_impl="splash": Pallas splash attention, sharded with shard_map over the step's mesh.

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) is a flash kernel for TPU:
it walks the keys block by block with a running softmax and never holds a [T, S] score matrix,
and it skips the blocks its mask rules out (half of them for causal attention). It works on
one example's [heads, length, K] arrays, so the batch is vmapped, and Mosaic kernels cannot be
partitioned by XLA, so under a mesh it runs inside jax.shard_map: rows split as the logical
axis "activation_batch" maps (data/fsdp/expert), heads as "activation_heads" maps (tensor), each
device running the kernel on its own rows and heads. The mesh and the rules are the ones the
step is traced under (jax.set_mesh and flax's logical_axis_rules); outside any mesh it runs on
one device.

- Masks: `AttentionMask.splash_segments` gives the padding and packing as SegmentIds and
  `AttentionMask.splash_mask` the mask object (CausalMask, LocalMask for a window, FullMask).
- Lengths: padded to a multiple of the block (the kernel tiles whole blocks of at least 128,
  its lane width); padded keys never match a query, padded queries are dropped.
- Blocks: `config.splash_block_size` (default: 512, or the largest power-of-two multiple of
  128 up to it that tiles the padded row).
- The kernel does not scale q: it is pre-scaled by 1/sqrt(d_k) as einsum does.
- Grouped-query attention: key heads go to the kernel as they are when the tensor axis divides
  them (or there is one), and are repeated up to the query heads otherwise.
- On any backend but TPU the kernel runs in Pallas interpret mode: correct and slow, for
  debugging a TPU config on a laptop; a log line says so once.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from transformer_jax.config import ModelConfig
from transformer_jax.model.kernels import scale_query
from transformer_jax.model.masks import AttentionMask

Array = jax.Array

LANES = sk.NUM_LANES  # 128: the smallest block the kernel tiles
DEFAULT_BLOCK = 512
_logger = logging.getLogger("transformer_jax")
_said_interpret: set[str] = set()


def splash_attention(
    query_BxTxHxK: Array,
    key_BxSxGxK: Array,
    value_BxSxGxK: Array,
    mask: AttentionMask,
    config: ModelConfig,
) -> Array:
    """softmax(Q K^T / sqrt(d_k)) V through splash attention; the output is [B, T, H, K]."""
    B, T, H, _ = query_BxTxHxK.shape
    S, G = key_BxSxGxK.shape[1], key_BxSxGxK.shape[2]
    q_segment_BxT, k_segment_BxS = mask.splash_segments()
    block = config.splash_block_size or DEFAULT_BLOCK
    Tp, Sp = _padded(T, block), _padded(S, block)
    q_BxHxTxK = _pad(jnp.swapaxes(scale_query(query_BxTxHxK), 1, 2), Tp, axis=2)
    k_BxGxSxK = _pad(jnp.swapaxes(key_BxSxGxK, 1, 2), Sp, axis=2)
    v_BxGxSxK = _pad(jnp.swapaxes(value_BxSxGxK, 1, 2), Sp, axis=2)
    # Block padding: keys get -1, which no real query has; queries read the row's first key,
    # or with a window (self-attention, Tp == Sp) the padded keys around them, as -1 too.
    k_segment_BxS = _pad(k_segment_BxS, Sp, axis=1, value=-1)
    pad_q = k_segment_BxS[:, :1] if mask.window is None else jnp.full((B, 1), -1, jnp.int32)
    q_segment_BxT = jnp.concatenate([q_segment_BxT, jnp.broadcast_to(pad_q, (B, Tp - T))], axis=1)

    mesh = jax.sharding.get_abstract_mesh()
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    interpret = platform != "tpu"
    if interpret and platform not in _said_interpret:
        _said_interpret.add(platform)
        _logger.warning(
            "attention_impl='splash' on %s runs the TPU kernel in Pallas interpret mode: "
            "correct, and much slower than einsum (use splash on TPU)",
            platform,
        )
    rows, heads = _mesh_axes(mesh)
    if B % _axis_size(mesh, rows):  # e.g. init's one dummy row: every device takes them all
        rows = None
    tensor = _axis_size(mesh, heads)
    if H % tensor:
        raise ValueError(
            f"attention_impl='splash': model.num_heads={H} is not divisible by the mesh axes "
            f"{heads} ({tensor} devices) that split heads; pick a tensor-parallel size that "
            f"divides {H}"
        )
    kv_heads = heads
    if G % tensor and G != 1:  # e.g. 2 key heads on a 4-way axis: give each query head its own
        k_BxGxSxK, v_BxGxSxK = (jnp.repeat(x, H // G, axis=1) for x in (k_BxGxSxK, v_BxGxSxK))
    elif G % tensor:  # one key head: every device keeps it whole
        kv_heads = None

    def local(q: Array, k: Array, v: Array, q_seg: Array, k_seg: Array) -> Array:
        kernel = _kernel(
            mask.splash_mask(q.shape[2], k.shape[2]), q.shape[1], block, interpret=interpret
        )

        def one_row(q: Array, k: Array, v: Array, q_seg: Array, k_seg: Array) -> Array:
            return kernel(q, k, v, segment_ids=sk.SegmentIds(q_seg, k_seg))

        return jax.vmap(one_row)(q, k, v, q_seg, k_seg)

    args = (q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, q_segment_BxT, k_segment_BxS)
    if mesh.empty or mesh.size == 1:
        out_BxHxTxK = local(*args)
    else:
        qkv_spec, kv_spec, seg_spec = P(rows, heads), P(rows, kv_heads), P(rows)
        out_BxHxTxK = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(qkv_spec, kv_spec, kv_spec, seg_spec, seg_spec),
            out_specs=qkv_spec,
            check_vma=False,
        )(*args)
    return jnp.swapaxes(out_BxHxTxK[:, :, :T], 1, 2)


def _mesh_axes(mesh: Any) -> tuple[Any, Any]:
    """The mesh axes that rows and heads split over, from the logical rules in force."""
    if mesh.empty:
        return None, None
    spec = nn.logical_to_mesh_axes(("activation_batch", "activation_heads", "activation_length"))
    if spec is None:  # no rules in force: nothing is split
        return None, None
    if spec[2] is not None:
        raise ValueError(
            f"attention_impl='splash': the logical rules split activation_length over {spec[2]}; "
            "the kernel takes whole rows (sequence parallelism is not supported)"
        )
    return spec[0], spec[1]


def _axis_size(mesh: Any, axes: Any) -> int:
    """How many devices the mesh axes (a name, a tuple of names or None) span."""
    if axes is None or mesh.empty:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[name] for name in names)


def _padded(length: int, block: int) -> int:
    """The row length the kernel runs: a multiple of 128, and of the block once it is longer."""
    length = -(-length // LANES) * LANES
    return length if length <= block else -(-length // block) * block


def _block(length: int, block: int) -> int:
    """The largest of block, block / 2, ..., 128 that tiles a padded length."""
    while length % block:
        block //= 2
    return block


def _pad(x: Array, length: int, axis: int, value: int = 0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _kernel(head_mask: Any, heads: int, block: int, *, interpret: bool) -> Any:
    """The splash kernel for one device's heads and this (padded) mask shape.

    Built in each trace that needs it, not cached: its mask tables become arrays of that trace
    (a kernel kept from another trace would carry that trace's tracers).
    """
    q_len, kv_len = head_mask.shape
    bq, bkv = _block(q_len, block), _block(kv_len, block)
    sizes = sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return sk.make_splash_mha(
        sm.MultiHeadMask([head_mask] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
