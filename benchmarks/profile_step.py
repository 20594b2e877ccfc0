"""Where the training step spends its GPU time: JAX's profiler over a few steps, kernel by
kernel, grouped into matrix products, attention, copies and the rest.

The same random model, batch and step as `bench_train_step.py` (the paper's settings on the
8B shape, batch 1 x 512 by default). It prints the step's time untraced, the GPU's busy time
per step (the rest is the GPU waiting), each group's share, and the kernels that took longest.
Groups go by kernel name: cuDNN's attention kernels; cuBLAS (nvjet, cutlass, xmma) and XLA's
own (Triton) matrix products; memory copies and sets; everything else (element-wise and
reduction fusions: norms, rotary, softmax, the optimizer, random bits).

    python benchmarks/profile_step.py --size 8b --variant lora_only   # gpu_check.sh: profile
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import sys
import tempfile
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import SIZES, device_batch, first_and_median, make_ours  # noqa: E402

GROUPS = (  # (group, substrings of a kernel's lower-cased name), first match wins
    ("attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("copies", ("memcpy", "memset")),
)


def group(kernel: str) -> str:
    low = kernel.lower()
    return next((name for name, marks in GROUPS if any(m in low for m in marks)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="8b")
    parser.add_argument("--variant", choices=["lora_only", "lisendiff"], default="lora_only")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="steps traced (and timed)")
    parser.add_argument("--top", type=int, default=30, help="kernels listed")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})")
    _, _, one_step = make_ours(args.size, args.variant == "lisendiff")
    batch = device_batch(args.size, args.batch, args.seq)
    compile_s, seconds = first_and_median(functools.partial(one_step, batch), args.steps)
    print(f"first step (compile) {compile_s:.1f} s")
    print(f"step untraced {seconds * 1e3:.1f} ms (median of {args.steps})")

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for i in range(args.steps):
                one_step(batch, 100 + i)
        (trace,) = Path(folder).glob("**/*.xplane.pb")
        profile = jax.profiler.ProfileData.from_file(str(trace))

    kernels, calls = collections.Counter(), collections.Counter()  # ns, calls over all steps
    for plane in profile.planes:
        if not re.match(r"/device:GPU:\d+$", plane.name):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):  # the kernels and copies the GPU ran
                for event in line.events:
                    kernels[event.name[:100]] += event.duration_ns
                    calls[event.name[:100]] += 1
    if not kernels:
        sys.exit("no GPU kernels in the trace: this profile reads an NVIDIA GPU's streams")
    groups = collections.Counter()
    for kernel, ns in kernels.items():
        groups[group(kernel)] += ns
    busy = sum(groups.values())
    per_step_ms = 1e-6 / args.steps
    print(f"GPU busy per step {busy * per_step_ms:.2f} ms")
    for name, ns in groups.most_common():
        print(f"  {name:16s} {ns * per_step_ms:8.2f} ms  {100 * ns / busy:5.1f}%")
    print(f"the {args.top} longest kernels, ms per step and calls per step:")
    for kernel, ns in kernels.most_common(args.top):
        print(f"  {ns * per_step_ms:7.3f} ms x{calls[kernel] // args.steps:4d} {kernel}")


if __name__ == "__main__":
    main()
