r"""SPP on a Swin Transformer: dense training -> search -> extract -> fine-tune -> evaluate -> report.

No pretrained Swin ships offline, so the default first trains a small Swin from scratch on Fashion-MNIST
(`model.init=random`, `dense.head=train`: the dense stage's steps train every weight), then runs the usual
stages on it. Variant "nano": 32 px input, 2x2 patches, three stages of 2 blocks at widths 32/64/128 with
2/4/8 heads (head dim 16), windows of 4 (shifted in stages 0 and 1; stage 2's 4x4 map is one window).
docs/rows/swin.md has the measured table and wall time:

  python launch/train.py --config configs/swin.py --workdir workdirs/swin_fmnist

Masks: one group per stage and kind (`stage0/qk`, `stage1/mlp`, ...; spp_jax/adapters/swin.py); a target
may address a stage, e.g. `groups:stage2=0.5`. Presets after the colon: `configs/swin.py:quick` (a smoke
run of a few minutes), `configs/swin.py:mu` (tiny, for tests). A user's Swin-T checkpoint (timm
safetensors, or a Hugging Face directory with --config.model.init=hf) on a user-prepared ImageNet:

  python launch/train.py --config configs/swin.py --workdir workdirs/swin_t_imagenet \
    --config.model.variant=T --config.model.init=timm \
    --config.model.init_path=/ckpt/swin_tiny_patch4_window7_224.safetensors \
    --config.model.image_size=224 --config.dense.head=probe --config.dense.finetune_steps=0 \
    --config.data.dataset=imagenet2012 --config.data.train_split=train \
    --config.data.search_split="train[:50000]" --config.data.eval_split=validation \
    --config.data.data_dir=/data/tfds --config.search.batch_size=256
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "image_classification"

    c.model = ml_collections.ConfigDict()
    c.model.arch = "swin"
    c.model.variant = "nano"  # mu | nano | T | S | B
    c.model.init = "random"  # random (trained by the dense stage) | timm | hf
    c.model.init_path = ""  # timm checkpoint file / Hugging Face directory
    c.model.image_size = 32
    c.model.groups = ("qk", "vo", "mlp")  # kinds; add "heads" for whole-head pruning
    # Compute dtype: float32 | bfloat16 (mixed precision: parameters, masks and SPP state stay float32).
    c.model.dtype = "float32"
    c.model.droppath_rate = 0.0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "fashion_mnist"
    c.data.data_dir = ""
    c.data.train_split = "train[:50000]"
    c.data.eval_split = "test"
    c.data.search_split = "train[50000:60000]"  # images the dense training never saw
    c.data.image_key = "image"
    c.data.label_key = "label"

    c.dense = ml_collections.ConfigDict()
    c.dense.head = "train"  # train every weight from model.init (a probe on random features is useless)
    c.dense.probe_steps = 500  # only for dense.head=probe (a pretrained backbone)
    c.dense.probe_lr = 3e-3
    c.dense.probe_weight_decay = 1e-4
    c.dense.finetune_steps = 1500  # from scratch: AdamW, warmup + cosine, finetune.batch_size, augmented
    c.dense.lr = 2e-3
    c.dense.augment = False

    c.search = ml_collections.ConfigDict()
    c.search.steps = 100
    c.search.batch_size = 32
    c.search.mode = "curvature"
    c.search.lr = 0.1
    c.search.kappa = config_dict.placeholder(float)
    c.search.nu = config_dict.placeholder(float)
    c.search.lam = config_dict.placeholder(float)
    c.search.shrink = config_dict.placeholder(str)
    c.search.base = config_dict.placeholder(str)
    c.search.curvature_chunks = 0  # curvature from per-example gradients (> 0: that many micro-batches)
    c.search.path_every = 10
    c.search.percent_points = True
    c.search.resume_every = 50
    c.search.eval_points = True
    c.search.eval_examples = 512

    c.extract = ml_collections.ConfigDict()
    c.extract.targets = ("params:0.5", "params:0.7", "flops:0.6")
    c.extract.round_to = 1
    c.extract.fold_masks = False
    c.extract.ranking = "path"
    c.extract.allocation = "per_group"
    c.extract.score_batches = 32
    c.extract.lasso_penalties = (0.75, 1.0, 1.25, 2.0)
    c.extract.lasso_steps = 50
    c.extract.lasso_lr = 0.02

    c.finetune = ml_collections.ConfigDict()
    c.finetune.steps = 200
    c.finetune.batch_size = 64
    c.finetune.lr = 5e-4
    c.finetune.warmup = 50
    c.finetune.weight_decay = 0.05
    c.finetune.augment = True
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
    c.family.targets = ("params:0.9", "params:0.8", "params:0.7", "params:0.6", "params:0.5")
    c.family.members_per_step = 3
    c.family.steps = 200
    c.family.lr = c.finetune.lr
    c.family.resume_every = 50
    c.family.eval_targets = ("params:0.9", "params:0.8", "params:0.7", "params:0.6", "params:0.5")

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 500
    c.eval.throughput_batch = 64

    c.mesh = ml_collections.ConfigDict()
    # Devices on the fsdp axis (a divisor of the device count): weights and AdamW states sharded over
    # them (docs/scaling.md, "Sharding the weights (FSDP)"); 1 = data parallel, weights replicated on
    # every device.
    c.mesh.fsdp = 1

    for preset in (arg or "").split(","):
        if preset == "quick":
            c.data.train_split, c.data.eval_split = "train[:10000]", "test[:2000]"
            c.dense.finetune_steps = 300
            c.search.steps, c.search.path_every, c.search.resume_every = 40, 10, 20
            c.finetune.steps = 40
            c.family.steps = c.finetune.steps
        elif preset == "mu":
            c.model.variant, c.model.image_size = "mu", 16
            c.data.train_split, c.data.eval_split = "train[:256]", "test[:128]"
            c.data.search_split = ""
            c.dense.finetune_steps = 4
            c.search.steps, c.search.batch_size, c.search.path_every, c.search.resume_every = 12, 16, 4, 5
            c.search.lr, c.search.eval_examples = 0.3, 64
            c.extract.targets = ("params:0.5", "groups:stage1=0.3")
            c.finetune.steps, c.finetune.batch_size = 4, 16
            c.family.steps, c.family.resume_every = 4, 2
            c.recovery = "separate"  # the run tests pin this route; tests/test_family.py runs the family
            c.family.eval_targets = ("params:0.9", "params:0.5")
            c.eval.batch_size, c.eval.throughput_batch = 64, 8
        elif preset:
            raise ValueError(f"unknown preset {preset!r} in configs/swin.py; use quick or mu")
    return c
