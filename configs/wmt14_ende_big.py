"""The paper's big model on WMT14 EN->DE (Table 3 "big": 213M parameters, 28.4 BLEU)."""

from __future__ import annotations

import ml_collections

from configs import wmt14_ende_base
from transformer_jax.experiment import model_section


def get_config() -> ml_collections.ConfigDict:
    """Big: d_model=1024, d_ff=4096, h=16, P_drop=0.3 for EN-DE, 300k steps."""
    config = wmt14_ende_base.get_config()
    # Table 3 big (d_model=1024, d_ff=4096, h=16, d_k=64) with P_drop=0.3 for EN-DE (section
    # 6.1): ModelConfig.preset("big"), the one source of these values; bfloat16 compute.
    config.model = model_section("big", dtype="bfloat16")
    config.train.num_steps = 300_000  # Section 5.2: 300k steps for big.
    config.train.checkpoint_every = 600  # About 10 minutes apart at 1.0 s/step.
    config.train.max_to_keep = 25  # Rolling checkpoints, for resuming.
    config.train.average_last = 20  # Section 6.1: big averages the last 20 checkpoints,
    config.train.average_every = 600  # 10 minutes apart.
    return config
