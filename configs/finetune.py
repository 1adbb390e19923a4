"""Fine-tune an imported model (python -m transformer_jax.convert --from-huggingface).

    python -m transformer_jax.convert --from-huggingface opus-mt-en-de --workdir runs/opus
    python train.py --config configs/finetune.py --workdir runs/opus

The model is the workdir's own (model_config.json, written by the import), the tokenizer its
imported vocabulary, and training starts from the imported parameters at step 0 with a fresh
optimizer. Data, schedule and evaluation are the default config's; point `data` at your corpus.
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """configs/default.py, with the model taken from the workdir and a gentler schedule."""
    config = default.get_config()
    # The model is the workdir's model_config.json. None here, so that a --config.model.X
    # override fails loudly instead of being silently replaced.
    config.model = None
    config.model_from_workdir = True
    # A pretrained model needs smaller steps than training from scratch. The paper's schedule,
    # scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), peaks at step = warmup: for
    # d_model 512 (OPUS-MT) and 100 warmup steps, 0.05 * 0.0442 * 0.1 = 2.2e-4.
    config.optim.learning_rate_scale = 0.05
    config.optim.warmup_steps = 100
    config.train.num_steps = 600
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
