"""The paper's base model on WMT14 EN->DE (Vaswani et al. 2017, sections 5 and 6, Table 3)."""

from __future__ import annotations

import ml_collections

from configs import default
from transformer_jax.experiment import model_section


def get_config() -> ml_collections.ConfigDict:
    """Base: N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1, 100k steps, warmup 4000."""
    config = default.get_config()

    # Table 3 base (N=6, d_model=512, d_ff=2048, h=8, d_k=64, P_drop=0.1) with the shared
    # ~37000-piece BPE vocabulary of section 5.1: ModelConfig.preset("base"), the one source of
    # these values; bfloat16 compute on TPU/GPU (parameters stay float32).
    config.model = model_section("base", dtype="bfloat16")

    config.data.kind = "tfds"  # tensorflow-datasets; prepare it first (docs/data.md).
    config.data.options = ml_collections.ConfigDict(
        {
            "name": "wmt14_translate/de-en",  # newstest2013 = validation, newstest2014 = test.
            "source_lang": "en",  # EN->DE although the tfds config is named de-en.
            "target_lang": "de",
            "data_dir": None,  # tfds data_dir with the prepared dataset (None = default).
            "manual_dir": None,  # Where manually downloaded files live, if any.
        }
    )
    config.data.test_split = "test"  # newstest2014, all 3003 lines (wmt14/full).
    config.data.max_source_length = 256  # Tokens per packed source row.
    config.data.max_target_length = 256  # Tokens per packed target row.
    config.data.tokens_per_batch = 25_000  # ~25000 target tokens per step (section 5.1).
    config.data.eval_batch_size = 64  # Rows per decoding batch.
    config.data.tokenizer.vocab_size = 37000  # Shared source+target BPE (section 5.1).
    config.data.tokenizer.model_type = "bpe"  # Byte-pair encoding, as the paper.
    config.data.tokenizer.max_sentences = 2_000_000  # Sentences sampled to train it.

    config.optim.warmup_steps = 4000  # Section 5.3.
    config.optim.learning_rate_scale = 1.0  # Exactly d_model^-0.5 * min(...): peak 6.99e-4.
    config.optim.label_smoothing = 0.1  # Section 5.4.

    config.train.num_steps = 100_000  # Section 5.2: 100k steps for base.
    config.train.log_every = 100  # Steps between metric lines.
    config.train.eval_every = 5000  # Steps between validation evaluations.
    config.train.eval_bleu_sentences = 500  # newstest2013 sentences decoded per evaluation.
    config.train.checkpoint_every = 1500  # About 10 minutes apart on 8 P100 (section 6.1).
    config.train.max_to_keep = 20  # Enough for averaging the last 5 (base) or 20 (big).
    config.train.num_samples = 5  # Test translations printed at the end.

    config.train.average_last = 5  # Section 6.1: base averages the last 5 checkpoints,
    config.train.average_every = 1500  # written at 10-minute intervals.
    config.train.keep_best = True  # And the best by newstest2013 BLEU, scored beside them.

    config.decode.beam_size = 4  # Section 6.1: beam 4, length penalty alpha 0.6.
    config.decode.alpha = 0.6
    config.decode.extra_length = 50  # Maximum output length = input length + 50.
    config.decode.max_length = 306  # Static buffer: 256 source tokens + 50.
    return config
