"""Train LisenDiff (or its LoRA-only baseline) from a config file.

    python train.py                                   # the embedded default, configs/tiny.py
    python train.py --config configs/llama_ja.py --workdir runs/llama_ja \
        --config.data.sources.j_daily_dialog.path=/data/jdd ...

Running it again on the same workdir resumes from the latest checkpoint. All visible devices
form the mesh of `--config.mesh.*` (data x fsdp x tensor). On several hosts, run the same
command on each with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or
under SLURM / Open MPI), the workdir on a shared file system (README, "Many devices").
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lisendiff_jax.config import ConfigError, check_key, load_config
from lisendiff_jax.errors import UserError
from lisendiff_jax.sharding import initialize_distributed
from lisendiff_jax.train.loop import train

HERE = Path(__file__).resolve().parent
FLAGS = flags.FLAGS


def check_command_line(args: list[str]) -> None:
    """Checks the config file and every --config.key before absl parses them, whose own
    errors for these cases are tracebacks."""
    path = HERE / "configs" / "tiny.py"
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path = Path(args[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
    config = load_config(path)
    for arg in args:
        if arg.startswith("--config."):
            check_key(config, arg[len("--config.") :].split("=", 1)[0])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    config = FLAGS.config
    workdir = Path(FLAGS.workdir or HERE / "workdirs" / config.name)
    try:
        initialize_distributed()  # before anything starts JAX's backends
        path = train(config, workdir)
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as err:
        sys.exit(f"error: {err}")
    if jax.process_index() == 0:  # one report for a multi-host run
        print(f"\ncheckpoint: {path}")
        print(f"next: python sample.py --workdir {workdir} --context 'I failed my exam today.'")


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"error: {err}")
    config_flags.DEFINE_config_file(
        "config", str(HERE / "configs" / "tiny.py"), "Experiment config file.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Run folder (default: workdirs/<config name>).")
    app.run(main)
