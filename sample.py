"""Reply to a conversation with a trained LisenDiff model (see lisendiff_jax/infer/chat.py).

python sample.py --workdir workdirs/tiny --context "I failed my exam today." --trace
python sample.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

from lisendiff_jax.infer.chat import main
from lisendiff_jax.infer.restore import command_line_stderr, exit_process

if __name__ == "__main__":
    command_line_stderr()
    default_workdir = Path(__file__).resolve().parent / "workdirs" / "tiny"
    exit_process(main(sys.argv[1:], default_workdir=default_workdir))
