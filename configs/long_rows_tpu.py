"""The base model on rows of 16,384 tokens, with splash attention, for a TPU slice (v5e-8).

Long rows pack many sentences (or hold long documents): attention is the one cost that grows
with the row length, L^2 per row. einsum and dot_product hold [rows, heads, L, L] scores on a
TPU (8 GiB of float32 scores per row and layer at 16k); splash attention never forms them.
Check that it fits before a run: python -m transformer_jax.aot --config=configs/long_rows_tpu.py
--topology=v5e-8 (figures in docs/benchmarks.md, "Train step memory vs sequence length").
"""

from __future__ import annotations

import ml_collections

from configs import wmt14_ende_base
from transformer_jax.experiment import model_section

ROW = 16_384  # Tokens per packed source row and per target row.


def get_config() -> ml_collections.ConfigDict:
    """wmt14_ende_base with 16k-token rows, splash attention and remat."""
    config = wmt14_ende_base.get_config()
    config.model = model_section(
        "base",
        dtype="bfloat16",  # bfloat16 compute (parameters stay float32).
        attention_impl="splash",  # Pallas splash attention: no [L, L] scores in HBM.
        remat="full",  # Keep only each layer's input: activations stay ~flat in L.
        max_len=ROW,  # Position table for the longest row.
    )
    config.data.max_source_length = ROW  # Tokens per packed source row.
    config.data.max_target_length = ROW  # Tokens per packed target row.
    # 114,688 target tokens: 8 rows at the 90% packing fill batches are sized with, one row
    # per chip on v5e-8.
    config.data.tokens_per_batch = 7 * ROW
    return config
