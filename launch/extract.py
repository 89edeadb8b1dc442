r"""Extract any target from an existing workdir's solution path (no re-search), or from a baseline.

  python launch/extract.py --workdir workdirs/vit_fmnist --target params:0.4 --target flops:0.5 \
      [--round_to 8] [--fold_masks] [--ranking fisher] [--allocation per_group]

Targets: params:F (fraction of block params), flops:F (fraction of total FLOPs), groups:F or
groups:qk=F,vo=F,mlp=F (fraction of entries per group), step:N (support of Gamma at path point N).
--ranking picks the ranking: path (the search), a one-shot baseline computed on the dense model
(random, magnitude, taylor, fisher, wanda; spp_jax/baselines.py) or lasso (l1-penalised mask runs, one per
penalty of the run's extract.lasso_penalties; spp_jax/lasso.py); --allocation how groups share a budget
(global: one ranking over all groups, per_group: the same fraction of every group).
Each model lands in WORKDIR/extracted/[<ranking>_]<target>[_global]/ (the ranking named unless it is the
path, the rule unless it is per_group) and loads with spp_jax.load_pruned(dir).

With --from_family the targets are cut from the run's weight family (WORKDIR/family, trained once by the
nested fine-tune) instead: any size, no fine-tuning, into WORKDIR/family_members/<target>/.
"""

from _common import load_run_config, run_main
from absl import flags

from spp_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir made by launch/train.py.", required=True)
_TARGETS = flags.DEFINE_multi_string("target", None, "Target(s) to extract.", required=True)
_ROUND_TO = flags.DEFINE_integer("round_to", None, "Round kept dims to a multiple (default: the run's).")
_FOLD = flags.DEFINE_bool("fold_masks", None, "Fold mask values into kept weights (default: the run's).")
# = spp_jax.baselines.RANKINGS (tests/test_baselines.py checks), spelled out: no jax import at flag parsing
RANKINGS = ["path", "random", "magnitude", "taylor", "fisher", "wanda", "lasso"]
_RANKING = flags.DEFINE_enum("ranking", None, RANKINGS, "Ranking (default: the run's).")
_FROM_FAMILY = flags.DEFINE_bool("from_family", False, "Cut the targets from WORKDIR/family (trained).")
_ALLOCATION = flags.DEFINE_enum(
    "allocation", None, ["global", "per_group"], "How groups share a budget (default: the run's)."
)


def main(argv):
    del argv
    if _ROUND_TO.value is not None and _ROUND_TO.value < 1:
        raise ConfigError(
            f"--round_to={_ROUND_TO.value} is not allowed; use an integer >= 1 (e.g. 8 for GPU, 128 for TPU)"
        )
    cfg = load_run_config(_WORKDIR.value)
    # the heavy imports only once the workdir is known to be one
    from spp_jax import checkpoint
    from spp_jax.run_config import validate_config
    from spp_jax.stages.context import make_context
    from spp_jax.stages.extract import extract_targets
    from spp_jax.workdir import Workdir

    if _ROUND_TO.value is not None:
        cfg.extract.round_to = _ROUND_TO.value
    if _FOLD.value is not None:
        cfg.extract.fold_masks = _FOLD.value
    for key, flag in (("ranking", _RANKING), ("allocation", _ALLOCATION)):
        if flag.value is not None:
            cfg.extract[key] = flag.value
    validate_config(cfg)
    wd = Workdir(_WORKDIR.value)
    ctx = make_context(cfg)
    if _FROM_FAMILY.value:
        from spp_jax.stages.family import save_members

        save_members(ctx, wd, _TARGETS.value, _ROUND_TO.value)  # logs each model
        return
    _, params, _ = checkpoint.load_pruned(wd.path / "dense")
    extract_targets(ctx, wd, params, _TARGETS.value)  # logs each model


if __name__ == "__main__":
    run_main(main)
