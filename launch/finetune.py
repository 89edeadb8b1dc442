r"""Fine-tune one saved model (extracted or dense) with the run's fine-tuning config.

  python launch/finetune.py --workdir workdirs/vit_fmnist \
      --model_dir workdirs/vit_fmnist/extracted/params_0.4 \
      [--steps 300] [--distill]
The result lands in WORKDIR/finetuned/<model_dir name>/.
"""

from pathlib import Path

from _common import load_run_config
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir made by launch/train.py.", required=True)
_MODEL = flags.DEFINE_string(
    "model_dir", None, "Saved model directory (arch_spec.json + params/).", required=True
)
_STEPS = flags.DEFINE_integer("steps", None, "Fine-tuning steps (default: the run's finetune.steps).")
_DISTILL = flags.DEFINE_bool("distill", None, "Distil from the dense model (default: the run's).")


def main(argv):
    del argv
    from spp_jax import checkpoint, run
    from spp_jax.errors import SPPError

    cfg = load_run_config(_WORKDIR.value)
    if _DISTILL.value is not None:
        cfg.finetune.distill = _DISTILL.value
    try:
        wd = run.Workdir(_WORKDIR.value)
        train_src, eval_src = run.sources(cfg)
        teacher = None
        if cfg.finetune.distill:
            module, params, _ = checkpoint.load_pruned(wd.path / "dense")
            teacher = (module, params)
        out = run.finetune_model(cfg, wd, Path(_MODEL.value), train_src, teacher, _STEPS.value)
        print(f"{out}: {run.evaluate_model(cfg, out, eval_src)}")
    except SPPError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
