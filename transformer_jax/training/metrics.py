"""Throughput accounting (FLOPs, MFU), metric writers and the console progress bar."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.model import moe
from transformer_jax.training import loss
from transformer_jax.training.step import AUX_LOSS_PREFIX, COUNT_PREFIX

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per chip (vendor data sheets): Cloud TPU system architecture pages for
# v4 / v5e / v5p / v6e; NVIDIA H100 SXM and H200 (989, without sparsity), A100 (312).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bf16 TFLOP/s for a jax device_kind, or None where unknown (CPU)."""
    # Longest names first so "TPU v5 lite" wins over "TPU v5".
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name in device_kind:
            return PEAK_BF16_TFLOPS[name]
    return None


def forward_flops(config: ModelConfig, rows: int, src_len: int, tgt_len: int) -> float:
    """Matmul FLOPs of one forward pass over [rows, src_len] -> [rows, tgt_len] padded batches.

    Counts what the hardware computes on the static shapes (packing padding included):
    2 FLOPs per multiply-add for projections, FFN, attention scores/values, and the logits.
    A mixture-of-experts layer counts its router and k experts per token (the active
    parameters): the dispatch einsums and empty capacity slots are left out.
    """
    d, f, v, k = config.d_model, config.d_ff, config.vocab_size, config.head_dim
    h, g = config.num_heads, config.kv_heads
    ffn = 2 * d * f * (3 if config.feed_forward == "swiglu" else 2)
    # A mixture-of-experts layer: the router, and k experts' FFNs per token (the active
    # parameters; the einsum dispatch's one-hot products and empty capacity slots not counted).
    expert = 2 * d * config.expert_d_ff * (3 if config.expert_feed_forward == "swiglu" else 2)
    moe_ffn = 2 * d * config.moe_num_experts + config.moe_experts_per_token * expert

    def ffns(stack: str, layers: int) -> int:
        moe_layers = len(config.moe_layers(stack))  # type: ignore[arg-type]
        return (layers - moe_layers) * ffn + moe_layers * moe_ffn

    qo, kv = 2 * 2 * d * h * k, 2 * 2 * d * g * k
    per_src = config.num_encoder_layers * (qo + kv + 2 * 2 * h * k * src_len) + ffns(
        "encoder", config.num_encoder_layers
    )
    per_tgt = config.num_decoder_layers * (
        qo + kv + 2 * 2 * h * k * tgt_len + qo + 2 * 2 * h * k * src_len
    ) + ffns("decoder", config.num_decoder_layers)
    cross_kv = config.num_decoder_layers * kv * src_len
    logits = 2 * d * v
    return float(rows * (src_len * per_src + tgt_len * (per_tgt + logits) + cross_kv))


def train_flops(config: ModelConfig, rows: int, src_len: int, tgt_len: int) -> float:
    """Forward + backward is about 3x the forward matmul FLOPs."""
    return 3.0 * forward_flops(config, rows, src_len, tgt_len)


def interval_summary(
    pending: Sequence[dict[str, jax.Array]],
    elapsed: float,
    step_flops: float,
    num_devices: int,
    peak: float | None,
) -> dict[str, float]:
    """One logging interval's step metrics (read back from the device once) and throughput.

    Non-finite (skipped) steps are left out of the loss and gradient norm; if every step of
    the interval was skipped those read NaN.
    """
    steps = jax.device_get(list(pending))
    host = [m for m in steps if bool(m.get("finite", True))]
    skipped = len(steps) - len(host)
    if not host:
        nan = float("nan")
        host = [{**steps[-1], "loss_sum": nan, "nll_sum": nan, "grad_norm": nan}]
    sums = {k: float(sum(m[k] for m in host)) for k in ("loss_sum", "nll_sum", "num_tokens")}
    summary = {
        k: float(v) for k, v in loss.summarize({k: jnp.asarray(v) for k, v in sums.items()}).items()
    }
    summary["grad_norm"] = float(np.mean([m["grad_norm"] for m in host]))
    # What layers report: auxiliary losses as the interval's mean, counts summed.
    for name in host[0]:
        if name.startswith(AUX_LOSS_PREFIX):
            summary[name] = float(np.mean([m[name] for m in host]))
    counts = {
        name.removeprefix(COUNT_PREFIX): np.sum([np.asarray(m[name]) for m in host], axis=0)
        for name in host[0]
        if name.startswith(COUNT_PREFIX)
    }
    summary.update(moe.routing_summary(counts))
    summary["learning_rate"] = float(host[-1]["learning_rate"])
    summary["target_tokens"] = sums["num_tokens"]
    summary["skipped_steps"] = float(skipped)
    step_time = elapsed / max(len(steps), 1)
    summary["step_time_s"] = step_time
    summary["tokens_per_sec"] = sums["num_tokens"] / max(elapsed, 1e-9)
    summary["tflops_per_device"] = step_flops / step_time / num_devices / 1e12
    if peak:
        summary["mfu"] = summary["tflops_per_device"] / peak
    rss = host_rss_bytes()
    if rss is not None:
        summary["host_rss_gb"] = rss / 1e9
    return summary


def host_rss_bytes() -> int | None:
    """This process's resident memory now (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def format_values(values: dict[str, float]) -> str:
    """name=value pairs for a log line."""
    shown = {k: v for k, v in values.items() if k != "target_tokens" and "/load/" not in k}
    return ", ".join(f"{k}={v:.4g}" for k, v in shown.items())


class MetricWriter:
    """TensorBoard scalars (process 0 only); a no-op elsewhere or without tensorboardX."""

    def __init__(self, logdir: os.PathLike[str] | str) -> None:
        self._writer: Any = None
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # the base install has it; stay usable if someone removed it
            log.warning("tensorboardX is not installed; TensorBoard logging is off")
            return
        self._writer = SummaryWriter(os.fspath(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Write one value per tag at this step."""
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def text(self, step: int, tag: str, value: str) -> None:
        """Write a text summary (sample translations, BLEU signature)."""
        if self._writer is not None:
            self._writer.add_text(tag, value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
