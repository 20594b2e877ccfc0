r"""Train LisenDiff (or its LoRA-only baseline) from a config file.

    python train.py                                   # the embedded default, configs/tiny.py
    python train.py --config configs/llama_ja.py --workdir runs/llama_ja \
        --config.data.sources.j_daily_dialog.path=/data/jdd ...
    python train.py --source mine=jsonl:/data/mine.jsonl:0.5 \
        --config.data.sources.mine.split=train           # add a corpus of your own

Running it again on the same workdir resumes from the latest checkpoint. All visible devices
form the mesh of `--config.mesh.*` (data x fsdp x tensor). On several hosts, run the same
command on each with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or
under SLURM / Open MPI), the workdir on a shared file system (README, "Many devices").
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lisendiff_jax.config import (
    SOURCE_SPEC,
    ConfigError,
    add_source,
    check_key,
    check_value,
    load_config,
)
from lisendiff_jax.errors import UserError
from lisendiff_jax.sharding import initialize_distributed
from lisendiff_jax.train.loop import train

HERE = Path(__file__).resolve().parent
FLAGS = flags.FLAGS


# --config.KEY=VALUE, --config.KEY VALUE, or for a bool --config.KEY / --noconfig.KEY.
_OVERRIDE = re.compile(r"--?(no)?config\.([^=]+)(=.*)?", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class CommandLine:
    config: ml_collections.ConfigDict  # the file's config with the --source corpora added
    config_file: Path
    argv: list[str]  # what absl parses: every argument but --config FILE


def _takes_value(args: list[str], i: int, flag: str) -> tuple[str, int]:
    """The value of `args[i]` given as `flag=value` or as `flag value`, and the next index."""
    if "=" in args[i]:
        return args[i].split("=", 1)[1], i + 1
    if i + 1 >= len(args):
        raise ConfigError(f"{flag}: needs a value")
    return args[i + 1], i + 2


def check_command_line(args: list[str]) -> CommandLine:
    """Loads the config file, adds every --source and checks every --config.KEY and its value
    before absl parses them, whose own errors for these cases are tracebacks or two-line
    FATALs. The --source corpora have to be in the config before absl sees it, so that
    --config.data.sources.NAME.* overrides can follow them."""
    path, sources, rest = HERE / "configs" / "tiny.py", [], []
    i = 0
    while i < len(args) and args[i] != "--":
        flag = args[i].split("=", 1)[0]
        if flag in ("--config", "-config"):
            value, i = _takes_value(args, i, "--config")
            path = Path(value)
        elif flag in ("--source", "-source"):
            value, i = _takes_value(args, i, "--source")
            sources.append(value)
            rest.append(f"--source={value}")
        else:
            rest.append(args[i])
            i += 1
    rest += args[i:]
    config = load_config(path)
    for spec in sources:
        add_source(config, spec)
    i = 0
    while i < len(rest) and rest[i] != "--":
        match = _OVERRIDE.fullmatch(rest[i])
        i += 1
        if not match:
            continue
        negated, key, assigned = match.groups()
        text = None if assigned is None else assigned[1:]
        is_bool = isinstance(check_key(config, key), bool)
        if negated and (not is_bool or text is not None):
            raise ConfigError(f"{rest[i - 1]}: only a bool option can be negated, with no value")
        if text is None and not is_bool:  # absl reads the next argument as the value
            if i >= len(rest):
                raise ConfigError(f"--config.{key}: needs a value")
            text, i = rest[i], i + 1
        if text is not None:
            check_value(config, key, text)
    return CommandLine(config, path, rest)


def define_flags(line: CommandLine, flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines --config (holding `line.config`, which --config.KEY=VALUE overrides), --source
    and --workdir for absl to parse `line.argv` with."""
    config_flags.DEFINE_config_dict(
        "config",
        line.config,
        "Experiment config file (a Python file with get_config()); --config.KEY=VALUE sets "
        "one option.",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=[sys.argv[0], *line.argv],
    )
    flag_values["config"].default_as_str = repr(str(line.config_file))  # not the whole dict
    flags.DEFINE_multi_string(
        "source",
        [],
        f"Adds a corpus, {SOURCE_SPEC} (FRACTION 1 by default), e.g. "
        "mine=jsonl:/data/mine.jsonl:0.5; it comes before the --config.* options, so "
        "--config.data.sources.NAME.split=... can follow.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "workdir", None, "Run folder (default: workdirs/<config name>).", flag_values=flag_values
    )


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
        args = FLAGS.read_flags_from_files(sys.argv[1:], force_gnu=False)  # --flagfile=...
        command_line = check_command_line(args)
    except (ConfigError, flags.Error) as err:
        sys.exit(f"error: {err}")
    define_flags(command_line)
    app.run(main, argv=[sys.argv[0], *command_line.argv])
