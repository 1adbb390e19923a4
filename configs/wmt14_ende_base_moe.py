"""The base model with a mixture of experts in every other layer, for TPU slices.

GShard's layout (Lepikhin et al. 2020, section 2.1) on the paper's base model: every other
feed-forward layer of the encoder and of the decoder (3 + 3 of them) becomes 16 experts of the
base FFN's shape (512 -> 2048 -> 512); each token goes to its top 2, so a token uses about
the base model's FFN compute twice over in those layers while the model holds 16 times their
FFN weights. The experts spread over the mesh's 'expert' axis (4 experts per chip on the 4
chips of v5p-8) and tokens reach them by all-to-all; the rest of the model is data parallel over
data x expert (docs/scaling.md). Check the memory before a run:
python -m transformer_jax.aot --config=configs/wmt14_ende_base_moe.py --topology=v5p-8
"""

from __future__ import annotations

import ml_collections

from configs import wmt14_ende_base
from transformer_jax.experiment import model_section


def get_config() -> ml_collections.ConfigDict:
    """wmt14_ende_base with 16 experts (top-2, capacity 1.25) in every other layer."""
    config = wmt14_ende_base.get_config()
    config.model = model_section(
        "base",
        dtype="bfloat16",  # bfloat16 compute (parameters and routing stay float32).
        moe_num_experts=16,  # Experts per MoE layer.
        moe_experts_per_token=2,  # Top-2 (GShard); 1 is Switch's top-1.
        moe_encoder_every=2,  # Encoder layers 2, 4, 6.
        moe_decoder_every=2,  # Decoder layers 2, 4, 6.
        moe_capacity_factor=1.25,  # GShard / Switch training capacity.
        moe_eval_capacity_factor=2.0,  # Switch's evaluation capacity.
        moe_load_balance_loss=1e-2,  # Switch's coefficient.
        moe_router_z_loss=1e-3,  # ST-MoE's coefficient.
    )
    # Every chip on 'expert' (it also splits the batch rows, as 'data' does): 4 experts a chip
    # on v5p-8, 2 on v5e-8. Past 16 chips keep expert=16 and put the rest on data, e.g.
    # --config.mesh.shape.data=2 --config.mesh.shape.expert=16 on 32 chips.
    config.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": -1, "tensor": 1})
    return config
