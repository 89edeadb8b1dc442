r"""Evaluate saved models: the task's metric on the run's eval split (top-1 accuracy, perplexity) and
throughput.

python launch/evaluate.py --workdir workdirs/vit_fmnist --model_dir workdirs/vit_fmnist/finetuned/params_0.5
python launch/evaluate.py --workdir workdirs/vit_fmnist --model_dir workdirs/vit_fmnist/family \
    --target params:0.63
"""

from _common import load_run_config, run_main
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir made by launch/train.py.", required=True)
_MODELS = flags.DEFINE_multi_string("model_dir", None, "Saved model directories.", required=True)
_TARGET = flags.DEFINE_string("target", None, "With a weight family (WORKDIR/family): the member to cut.")


def main(argv):
    del argv
    cfg = load_run_config(_WORKDIR.value)
    # the heavy imports only once the workdir is known to be one
    import jax

    from spp_jax.family import load_pruned
    from spp_jax.stages.context import make_context
    from spp_jax.stages.finetune import evaluate_model

    ctx = make_context(cfg)
    metric, unit = ctx.task.metric, ctx.task.throughput_unit
    loaded = {d: load_pruned(d, _TARGET.value) for d in _MODELS.value}  # every directory checked first
    for d, (_, params, _) in loaded.items():
        n = sum(v.size for v in jax.tree.leaves(params))
        r = evaluate_model(ctx, d, target=_TARGET.value)
        print(f"{d}: {n / 1e6:.2f}M params, {metric} {r[metric]:.4f}, {r['throughput']:.1f} {unit}")


if __name__ == "__main__":
    run_main(main)
