r"""Evaluate saved models: top-1 accuracy on the run's eval split and inference throughput.

python launch/evaluate.py --workdir workdirs/vit_fmnist --model_dir workdirs/vit_fmnist/finetuned/params_0.5
"""

from _common import load_run_config
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir made by launch/train.py.", required=True)
_MODELS = flags.DEFINE_multi_string("model_dir", None, "Saved model directories.", required=True)


def main(argv):
    del argv
    import jax

    from spp_jax import checkpoint, run
    from spp_jax.errors import SPPError

    cfg = load_run_config(_WORKDIR.value)
    try:
        _, eval_src = run.sources(cfg)
        for d in _MODELS.value:
            _, params, _ = checkpoint.load_pruned(d)
            n = sum(v.size for v in jax.tree.leaves(params))
            print(f"{d}: params {n} {run.evaluate_model(cfg, d, eval_src)}")
    except SPPError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
