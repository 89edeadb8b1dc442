r"""Run SPP end to end: dense model -> search -> extract -> fine-tune -> evaluate -> report.

  python launch/train.py --config configs/vit.py --workdir workdirs/vit_fmnist [--config.x=y ...]
  python launch/train.py --config configs/llama.py --workdir workdirs/smollm2_books

The config names the architecture (`model.arch`: vit, llama) and the task (`task`: image_classification,
causal_lm).

Rerunning with the same --workdir resumes (finished stages are skipped, the search continues from its
latest state, bit for bit). SIGTERM (preemption) or Ctrl-C stop the search at the end of the current step
with a resume state saved. A changed search setting needs --fresh_search (the old search moves to
WORKDIR/discarded/).

Several processes (TPU pod, multi-node GPU, several CPU processes): run the same command in every process
with --distributed; JAX reads the process count and id from a TPU pod, a SLURM job or Open MPI, elsewhere
give them (docs/scaling.md, "Many processes, pods and clusters"):

  python launch/train.py --config configs/vit.py --workdir /shared/vit_fmnist \
      --coordinator_address=10.0.0.2:8476 --num_processes=2 --process_id=0   # and --process_id=1
"""

from pathlib import Path

from _common import FLAGS, define_distributed_flags, run_main, start_distributed
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/vit.py[:preset]."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<config name>).")
_FRESH = flags.DEFINE_bool(
    "fresh_search", False, "Start a new search in an existing workdir (the old one moves to discarded/)."
)
_UNTIL = flags.DEFINE_enum(
    "until", "finetune", ["dense", "search", "extract", "finetune"],
    "Last stage to run (finetune = the whole run: fine-tune, evaluate, report).",
)  # fmt: skip
define_distributed_flags()
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    start_distributed()  # before anything touches the devices
    from spp_jax.run_config import validate_config

    validate_config(_CONFIG.value)  # before the heavy imports of spp_jax.run: a bad value fails in ~1 s
    from spp_jax import run

    workdir = _WORKDIR.value or str(Path("workdirs") / Path(FLAGS["config"].config_filename).stem)
    run.run_all(_CONFIG.value, workdir, fresh_search=_FRESH.value, until=_UNTIL.value)


if __name__ == "__main__":
    run_main(main)
