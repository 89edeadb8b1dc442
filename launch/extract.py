r"""Extract any target from an existing workdir's solution path (no re-search).

  python launch/extract.py --workdir workdirs/vit_fmnist --target params:0.4 --target flops:0.5 \
      [--round_to 8] [--fold_masks]

Targets: params:F (fraction of block params), flops:F (fraction of total FLOPs), groups:F or
groups:qk=F,vo=F,mlp=F (fraction of entries per group), step:N (support of Gamma at path point N).
Each model lands in WORKDIR/extracted/<target>/ and loads with spp_jax.load_pruned(dir).
"""

from _common import load_run_config
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir made by launch/train.py.", required=True)
_TARGETS = flags.DEFINE_multi_string("target", None, "Target(s) to extract.", required=True)
_ROUND_TO = flags.DEFINE_integer("round_to", None, "Round kept dims to a multiple (default: the run's).")
_FOLD = flags.DEFINE_bool("fold_masks", None, "Fold mask values into kept weights (default: the run's).")


def main(argv):
    del argv
    from spp_jax import checkpoint, run
    from spp_jax.errors import SPPError

    cfg = load_run_config(_WORKDIR.value)
    if _ROUND_TO.value is not None:
        cfg.extract.round_to = _ROUND_TO.value
    if _FOLD.value is not None:
        cfg.extract.fold_masks = _FOLD.value
    try:
        wd = run.Workdir(_WORKDIR.value)
        _, eval_src = run.sources(cfg)
        _, params, arch = checkpoint.load_pruned(wd.path / "dense")
        adapter = run.build_adapter(cfg)
        for t in run.extract_targets(cfg, wd, adapter, params, eval_src, _TARGETS.value):
            print(
                f"{t['target']}: {t['params']} params ({t['params_frac']:.1%}), "
                f"{2 * t['macs'] / 1e9:.3f} GFLOPs ({t['macs_frac']:.1%}), acc {t['accuracy_masked']:.4f}"
                f" -> {t['dir']}"
            )
    except SPPError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
