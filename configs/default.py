"""The embedded default: tiny model, built-in EN->DE corpus, CPU, a few minutes."""

from __future__ import annotations

import ml_collections

from transformer_jax.experiment import model_section


def get_config() -> ml_collections.ConfigDict:
    """Config for `python train.py` with no flags."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Parameter init, dropout and data shuffling all derive from this.

    # Becomes ModelConfig(**config.model). Every field comes from the "tiny" preset, the one
    # place its values live (PRESETS in transformer_jax/config.py; docs/model.md explains each
    # switch). Override any field here or with --config.model.FIELD=value.
    config.model = model_section("tiny")
    # True: the model is the workdir's model_config.json (an imported one, for fine-tuning:
    # configs/finetune.py), and config.model is ignored.
    config.model_from_workdir = False

    config.data = ml_collections.ConfigDict()
    config.data.kind = "builtin"  # "builtin" | "tfds" | "text" | "tsv" (docs/data.md).
    config.data.options = ml_collections.ConfigDict({"seed": 0})  # Options of that source.
    config.data.train_split = "train"  # Split names passed to the source.
    config.data.validation_split = "validation"
    config.data.test_split = "test"  # Decoded in full at the end; "" to skip.
    config.data.max_source_length = 64  # Tokens per packed source row (EOS included).
    config.data.max_target_length = 64  # Tokens per packed target row.
    config.data.tokens_per_batch = 2048  # Target tokens per step, all hosts together.
    config.data.eval_batch_size = 128  # Rows per evaluation/decoding batch.
    config.data.tokenizer = ml_collections.ConfigDict()
    config.data.tokenizer.vocab_size = 1024  # SentencePiece pieces (shared EN+DE).
    config.data.tokenizer.model_type = "bpe"  # "bpe" (paper: BPE) | "unigram".
    config.data.tokenizer.max_sentences = 1_000_000  # Cap on tokenizer training sentences.
    # Resuming on another number of processes cannot continue the data stream exactly (a few
    # examples repeat or are skipped; the run says how many): True accepts that, False refuses.
    config.data.reshard_on_resume = False

    config.optim = ml_collections.ConfigDict()
    config.optim.warmup_steps = 400  # Paper: 4000 (a short run needs a short warmup).
    config.optim.learning_rate_scale = 1.0  # Multiplies d_model^-0.5 * min(...) (paper: 1).
    config.optim.b1 = 0.9  # Adam beta1 (paper).
    config.optim.b2 = 0.98  # Adam beta2 (paper).
    config.optim.eps = 1e-9  # Adam epsilon (paper).
    config.optim.clip_norm = None  # Global-norm clipping; None = off (paper).
    config.optim.weight_decay = 0.0  # Decoupled weight decay; 0 = Adam (paper).
    config.optim.grad_accum_steps = 1  # Micro-batches per step (same update as one big batch).
    config.optim.label_smoothing = 0.1  # Paper.
    # A step whose loss, gradients or update is NaN/inf is never saved. False (the paper's
    # recipe): the run stops at the next log or save naming the step. True: such steps leave
    # the state unchanged (as fairseq skips them) and are counted in the logs.
    config.optim.skip_nonfinite_updates = False
    config.optim.max_nonfinite_in_a_row = 10  # With skipping: stop after this many in a row.

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 1200  # Optimizer steps (about 4 minutes on 2 CPU cores).
    config.train.log_every = 100  # Steps between metric lines.
    config.train.eval_every = 400  # Steps between validation loss + BLEU; 0 = end only.
    config.train.eval_bleu_sentences = 256  # Validation sentences decoded per evaluation.
    config.train.checkpoint_every = 400  # Steps between (async) checkpoints.
    config.train.max_to_keep = 3  # Checkpoints kept.
    config.train.async_checkpointing = True  # Save in the background.
    config.train.num_samples = 5  # Test translations printed at the end.
    # Checkpoint averaging (section 6.1): keep the parameters of the last average_last steps
    # that are multiples of average_every (in WORKDIR/checkpoints_average/, apart from the
    # rolling checkpoints), average them at the end into WORKDIR/averaged_last<N>/ and score
    # that too. 0 = off.
    config.train.average_last = 0
    config.train.average_every = 100
    # Keep the checkpoint with the best validation BLEU in WORKDIR/best/ (never rotated away)
    # and score it at the end; stop after early_stopping_patience evaluations without a new
    # best (0 = never stop early).
    config.train.keep_best = False
    config.train.early_stopping_patience = 0

    config.decode = ml_collections.ConfigDict()
    # The decoding of the final test scores (beside greedy, always reported): beam_size 1 keeps
    # it greedy, for speed on a CPU; the paper configs use beam 4, alpha 0.6 (section 6.1).
    config.decode.beam_size = 1
    config.decode.alpha = 0.6  # GNMT length penalty exponent (beam search only).
    config.decode.extra_length = 50  # Output cap = source length + 50 (paper section 6.1).
    config.decode.max_length = 96  # Static decode buffer length.

    config.mesh = ml_collections.ConfigDict()
    # 'expert' places mixture-of-experts weights (model.moe_num_experts; docs/scaling.md).
    config.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
    config.mesh.logical_axis_rules = None  # None = sharding.DEFAULT_RULES.
    return config
