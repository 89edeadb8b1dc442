r"""Run SPP end to end: dense head fit -> search -> extract -> fine-tune -> evaluate -> report.

  python launch/train.py --config configs/vit.py --workdir workdirs/vit_fmnist [--config.x=y ...]

Rerunning with the same --workdir resumes (finished stages are skipped, the search continues from its
latest state). Multi-host (TPU pod / multi-node GPU): run the same command on every host with
--distributed, which calls jax.distributed.initialize() before anything touches the devices.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spp_jax.errors import SPPError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/vit.py[:preset]."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<config name>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from spp_jax import run

    workdir = _WORKDIR.value or str(Path("workdirs") / Path(flags.FLAGS["config"].config_filename).stem)
    try:
        run.run_all(_CONFIG.value, workdir)
    except SPPError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
