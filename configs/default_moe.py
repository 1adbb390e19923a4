"""The embedded default with a mixture of experts: the same active parameters per token.

Every second encoder and decoder layer (layer 2 of 2 in each stack) holds 8 experts of width
256 and routes each token to 2 of them, so a token passes through 2 x 256 = 512 hidden units,
as in the dense default's FFN. The active parameters match the dense model's (1,059,072 per
token against 1,056,768: a 128 x 8 router per MoE layer) while the parameters grow 1.75x, to
1,850,112. benchmarks/moe_vs_dense.py trains this config beside configs/default.py (figures
in docs/model.md).
"""

from __future__ import annotations

import ml_collections

from configs import default
from transformer_jax.experiment import model_section


def get_config() -> ml_collections.ConfigDict:
    """configs/default.py with 8 experts (top-2, width 256) in every other layer."""
    config = default.get_config()
    config.model = model_section(
        "tiny",
        moe_num_experts=8,  # Experts per MoE layer.
        moe_experts_per_token=2,  # Top-2 (GShard); 1 is Switch's top-1.
        moe_encoder_every=2,  # Layers 2, 4, ... of the encoder (fairseq's moe-freq).
        moe_decoder_every=2,
        moe_d_ff=256,  # k x moe_d_ff = the dense d_ff (512): the same active FFN width.
        moe_capacity_factor=1.25,  # Training slots per expert: ceil(k x row x 1.25 / 8).
        moe_eval_capacity_factor=2.0,  # Evaluation and decoding (Switch's 2.0).
    )
    return config
