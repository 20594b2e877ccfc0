"""The command line of `sample.py`: one reply, a JSONL batch, or an interactive chat.

    python sample.py --workdir DIR --context "I failed my exam today."
    python sample.py --context "I failed my exam. ||| Oh no, what happened? ||| I froze." --trace
    python sample.py --context "Turn one" --context "Turn two" --style default --lang yue --json
    python sample.py --context "I failed my exam today." --empathy 2   # past the empathy style
    python sample.py --input requests.jsonl --output replies.jsonl
    python sample.py --chat
    python sample.py --backbone meta-llama/Llama-3.1-8B-Instruct --context "..."   # BaseLLM

Context turns run oldest first and the newest is the user's; give them as repeated --context
options, or within one option separated by " ||| ". --workdir takes a training workdir (a
LisenDiff or LoRA-only run) or a folder written by `python -m lisendiff_jax.export`; without
it the embedded default's workdir is used. --backbone samples an untrained backbone.

--empathy W turns the dial between the styles: 0 is the default style, 1 the empathy style
(what --style gives), values in between mix them and values above 1 push past empathy; it
overrides --style. --guidance G (1: none) guides the latent by the context, for a model
trained with --config.model.denoiser.context_dropout > 0.

The --input format and the output's fields are in `REQUESTS` (the end of --help). Every request
has a seed, echoed with its reply: its own, or --seed plus its place among the file's requests,
so that `--context ... --seed SEED` gives the same reply alone; it does not depend on
--batch-size. With --trace each trace row draws its tokens with its reply's randomness, so the
rows differ by their latent only and the t = 0 row is the reply.

Errors are one line on stderr with exit status 1; a context cut to fit the model is a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lisendiff_jax.data.example import STYLES
from lisendiff_jax.data.formatting import SYSTEM_PROMPTS
from lisendiff_jax.errors import UserError

LANGS = ", ".join(sorted(SYSTEM_PROMPTS))
REQUESTS = f"""\
Context turns: oldest first (the newest is the user's), as repeated --context options or
separated by ' ||| ' within one.

--input FILE is JSON Lines, one request per line (blank lines are skipped), e.g.
  {{"id": "a", "context": ["I failed my exam.", "Oh no!", "I froze."], "lang": "yue", "seed": 5}}
  context  required: a list of turns, or one string of turns separated by ' ||| '
  id       optional: any JSON value, echoed with the reply
  style    optional: {" or ".join(STYLES)} (default: --style)
  empathy  optional: the dial w, a number; overrides style (default: --empathy)
  guidance optional: the guidance scale g, a number (default: --guidance)
  lang     optional: the reply's language, one the run has a system prompt for: {LANGS}
           built in, others from the prompts file it trained with (default: --lang)
  seed     optional: an integer (default: --seed plus the request's place among the file's
           requests, 0 for the first); the reply is the one `--context ... --seed SEED` gives

Output: text on stdout, each reply of an --input file after its request's id (or line number)
and seed. With --json, or into --output, one JSON object per reply: "id" (if given), "seed",
"context", "style", "empathy" (null: the style), "guidance", "lang", "reply", "truncated" (the
context was cut to fit the model) and,
with --trace, "trace" (a list of {{"t", "reply"}}); --json adds "latent", the sampled latent
([L, d] floats; null for a model without LisenDiff modules).
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Reply to a conversation with a trained LisenDiff model.",
        epilog=REQUESTS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_argument_group("model")
    source.add_argument("--workdir", help="training workdir or exported folder")
    source.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    source.add_argument("--backbone", help="sample an untrained backbone (hub id or folder)")
    source.add_argument("--dtype", choices=("float32", "bfloat16"), help="backbone dtype")
    what = p.add_argument_group("requests")
    what.add_argument("--context", action="append", default=[], help="turn(s), repeatable")
    what.add_argument("--style", choices=STYLES, default="empathy")
    what.add_argument(
        "--empathy", type=float, metavar="W", help="the dial: 0 default, 1 empathy, 2 beyond"
    )
    what.add_argument(
        "--guidance", type=float, default=1.0, metavar="G", help="context guidance (1: none)"
    )
    what.add_argument("--lang", help="reply language, e.g. zh or ko (default: the run's)")
    what.add_argument("--input", type=Path, help="JSONL file of requests (format below)")
    what.add_argument("--output", type=Path, help="JSONL file for the replies (fields below)")
    what.add_argument("--chat", action="store_true", help="interactive: keep the conversation")
    how = p.add_argument_group("sampling")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    how.add_argument("--top-p", type=float, default=0.9)
    how.add_argument("--max-tokens", type=int, default=64)
    how.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    how.add_argument("--ddim-steps", type=int, default=10)
    how.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale, 0 to 1")
    how.add_argument("--batch-size", type=int, default=16)
    show = p.add_argument_group("output")
    show.add_argument("--trace", action="store_true", help="also decode the last steps' y0")
    show.add_argument("--trace-steps", type=int, default=5, help="how many last steps")
    show.add_argument(
        "--json", action="store_true", help="one JSON object per reply, with its latent"
    )
    return p


def _model_folder(args: argparse.Namespace, default_workdir: Path | None) -> Path | None:
    """The workdir or export folder to load (None: --backbone), checked before any loading."""
    from lisendiff_jax.infer.restore import RestoreError

    if args.backbone:
        if args.workdir:
            raise RestoreError("give --workdir or --backbone, not both")
        return None
    workdir = Path(args.workdir) if args.workdir else default_workdir
    if workdir is None or not workdir.exists():
        if args.workdir:
            raise RestoreError(f"{workdir}: no such workdir")
        raise RestoreError(
            f"no --workdir given and {workdir} does not exist: train the embedded default "
            "first with `python train.py` (a few minutes on a CPU), or pass --workdir DIR "
            "or --backbone HUB_OR_PATH"
        )
    return workdir


def load_model(
    folder: Path | None, backbone: str | None, step: int | None = None, dtype: str | None = None
):
    """(model, config, tokenizer) from a training workdir, an export folder, or, when `folder`
    is None, a bare backbone: what sample.py and the server can talk to."""
    from lisendiff_jax.export import is_export, load_exported
    from lisendiff_jax.infer.restore import load_base, load_workdir

    if folder is None:
        return load_base(backbone, dtype or "bfloat16")
    if is_export(folder):
        return load_exported(folder, dtype)
    return load_workdir(folder, step, dtype)


def _requests_from_file(
    path: Path, args: argparse.Namespace, listener: Any, options: Any
) -> Iterator[tuple[str, dict, Any]]:
    """(label, extra output fields, inference.Request) of each line; an error names the line."""
    from lisendiff_jax.infer.inference import InputError, Request, split_turns

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    index = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or "context" not in record:
                raise InputError(f'{where}: expected an object with a "context"')
            context = record["context"]
            turns = split_turns(context) if isinstance(context, str) else context
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise InputError(f"{where}: context must be a string or a list of strings")
            seed = record.get("seed", args.seed + index)
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise InputError(f"{where}: seed must be an integer")
            try:
                request = Request(
                    tuple(turns),
                    record.get("style", args.style),
                    record.get("lang", args.lang),
                    seed,
                    record.get("empathy", args.empathy),
                    record.get("guidance", args.guidance),
                )
                listener.check(request, options)
            except InputError as err:
                raise InputError(f"{where}: {err}") from None
            index += 1
            if "id" in record:
                yield (
                    f"id {json.dumps(record['id'], ensure_ascii=False)}",
                    {"id": record["id"]},
                    request,
                )
            else:
                yield f"line {number}", {}, request


def _record(request, reply, extra: dict, with_latent: bool) -> dict:
    record = dict(extra)
    record.update(
        seed=request.seed,
        context=list(request.context),
        style=request.style,
        empathy=request.empathy,
        guidance=request.guidance,
        lang=request.lang,
        reply=reply.text,
        truncated=reply.truncated,
    )
    if with_latent:
        record["latent"] = None if reply.latent is None else reply.latent.tolist()
    if reply.trace:
        record["trace"] = [{"t": s.t, "reply": s.text} for s in reply.trace]
    return record


def _text(label: str | None, request, reply) -> str:
    head = "" if label is None else f"{label}, seed {request.seed}: "
    return head + reply.text + "\n" + "".join(f"  t={s.t}: {s.text}\n" for s in reply.trace)


def _chat(listener, options, args: argparse.Namespace, history: list[str]) -> None:
    from lisendiff_jax.infer.inference import InputError, Request

    print("chat: type a message; /reset forgets the conversation, /quit (or Ctrl-D) ends it")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line == "/quit":
            return
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append(line)
        request = Request(
            tuple(history), args.style, args.lang, empathy=args.empathy, guidance=args.guidance
        )
        try:
            reply = listener.reply([request], options)[0]
        except InputError as err:  # e.g. a grown prompt and --max-tokens overflow the model
            history.pop()
            print(f"error: {err}", file=sys.stderr)
            continue
        history.append(reply.text)
        print("listener> " + _text(None, request, reply), end="")


def run(args: argparse.Namespace, default_workdir: Path | None) -> None:
    from lisendiff_jax.infer.inference import InputError, Listener, Options, Request, split_turns

    history = [turn for text in args.context for turn in split_turns(text)]
    folder = _model_folder(args, default_workdir)
    if not (args.chat or args.input):
        if not args.context:
            raise InputError("nothing to answer: give --context TEXT, --input FILE or --chat")
        if not history:
            raise InputError("empty context: give at least one non-blank turn")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    for option in ("empathy", "guidance"):  # before any weights load
        value = getattr(args, option)
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{option} must be finite, got {value}")
    model, config, tokenizer = load_model(folder, args.backbone, args.step, args.dtype)
    args.lang = args.lang or config.data.target_lang
    if args.trace and not model.lisendiff:
        warnings.warn("no trace: this model has no LisenDiff modules (no latent)", stacklevel=1)
    try:
        options = Options(
            seed=args.seed,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            sampler=args.sampler,
            ddim_steps=args.ddim_steps if args.sampler == "ddim" else 0,
            eta=args.eta,
            trace_steps=args.trace_steps if args.trace else 0,
        )
        listener = Listener(model, config, tokenizer)
        listener.prepare(options)
    except ValueError as err:  # sampling settings out of range
        raise InputError(str(err)) from None

    if args.chat:
        _chat(listener, options, args, history)
        return
    if args.input:
        entries = list(_requests_from_file(args.input, args, listener, options))
        if not entries:
            raise InputError(f"{args.input}: no requests in the file")
        labels, extras, requests = zip(*entries, strict=True)
    else:
        labels, extras = [None], [{}]
        requests = [
            Request(tuple(history), args.style, args.lang, args.seed, args.empathy, args.guidance)
        ]
    replies = listener.reply(list(requests), options, args.batch_size)
    answered = zip(labels, extras, requests, replies, strict=True)
    if args.json or args.output:
        text = "".join(
            json.dumps(_record(q, r, extra, args.json), ensure_ascii=False) + "\n"
            for _, extra, q, r in answered
        )
    else:
        text = "".join(_text(label, q, r) for label, _, q, r in answered)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def main(argv: Sequence[str] | None = None, default_workdir: Path | None = None) -> int:
    """Runs the command line; returns the exit status (errors print one line)."""
    args = parser().parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # orbax logs at INFO and WARNING while restoring

    def one_line_warning(message, category, *rest, **kwargs):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning
        try:
            run(args, default_workdir)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0
