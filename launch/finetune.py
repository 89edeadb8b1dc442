r"""Fine-tune one saved model (extracted or dense) with the run's fine-tuning config.

  python launch/finetune.py --workdir workdirs/vit_fmnist \
      --model_dir workdirs/vit_fmnist/extracted/params_0.4 \
      [--steps 300] [--distill]
The result lands in WORKDIR/finetuned/<model_dir name>/ (a complete one with the same source and steps is
kept, not redone).
"""

from pathlib import Path

from _common import load_run_config, run_main
from absl import flags

from spp_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir made by launch/train.py.", required=True)
_MODEL = flags.DEFINE_string(
    "model_dir", None, "Saved model directory (arch_spec.json + params/).", required=True
)
_STEPS = flags.DEFINE_integer("steps", None, "Fine-tuning steps (default: the run's finetune.steps).")
_DISTILL = flags.DEFINE_bool("distill", None, "Distil from the dense model (default: the run's).")


def main(argv):
    del argv
    if _STEPS.value is not None and _STEPS.value < 1:
        raise ConfigError(f"--steps={_STEPS.value} is not allowed; use an integer >= 1")
    cfg = load_run_config(_WORKDIR.value)
    # the heavy imports only once the workdir is known to be one
    from spp_jax import checkpoint, preemption
    from spp_jax.stages.context import make_context
    from spp_jax.stages.finetune import evaluate_model, finetune_model
    from spp_jax.workdir import Workdir

    if _DISTILL.value is not None:
        cfg.finetune.distill = _DISTILL.value
    wd = Workdir(_WORKDIR.value)
    ctx = make_context(cfg)
    checkpoint.load_pruned(_MODEL.value)  # checked before anything is written
    teacher = checkpoint.load_pruned(wd.path / "dense")[:2] if cfg.finetune.distill else None
    with preemption.stop_signals():
        out = finetune_model(ctx, wd, Path(_MODEL.value), teacher, _STEPS.value)
        r = evaluate_model(ctx, out)
    metric, unit = ctx.task.metric, ctx.task.throughput_unit
    print(f"{out}: {metric} {r[metric]:.4f}, {r['throughput']:.1f} {unit}")


if __name__ == "__main__":
    run_main(main)
