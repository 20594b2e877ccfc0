"""The evaluation's command line: simulate, rate, compare, report.

    python -m lisendiff_jax.evaluation simulate --system ours --out runs/eval/transcripts.jsonl \\
        --speaker-url http://host/v1 --speaker-model gpt-4o --speaker-key-env OPENAI_API_KEY \\
        --listener-url http://127.0.0.1:8000/v1 --listener-model tiny
    python -m lisendiff_jax.evaluation simulate --system ours --empathy 0,1,2 ...  # a dial sweep
    python -m lisendiff_jax.evaluation rate --transcripts runs/eval/transcripts.jsonl \\
        --out runs/eval/ratings.jsonl --judge-url ... --judge-model ...
    python -m lisendiff_jax.evaluation compare --x ours --y base ... --out runs/eval/ab.jsonl
    python -m lisendiff_jax.evaluation report --ratings runs/eval/ratings.jsonl \\
        --outcomes runs/eval/ab.jsonl --out-dir runs/eval

Every role is an OpenAI-compatible endpoint: --ROLE-url, --ROLE-model, --ROLE-key-env (the
name of the environment variable holding the API key; the key itself is never printed) and
--ROLE-extra (a JSON object sent with every request, e.g. '{"style": "empathy"}' for our
server). `simulate --empathy 0,1,2` sweeps the empathy dial of our server: one listener per
setting w, named SYSTEM@w=W, each sending {"empathy": W} (0: the default style, 1: the
empathy style, 2: past it); `rate` then rates them all and `report` tables them side by side.
Situations default to the bundled Mandarin and Cantonese ones; --situations FILE takes a
user's in any language (the same fields; the speaker and judge prompts name the language).
Every finished conversation, rating and A/B judgment (one order of one pair) is appended to
--out as it is made, so a run again with the same --out resumes: it repeats and loses none.
Judge failures (replies that never parsed) are written to the output file's `.failures.jsonl`
sibling and counted on stderr, never in the results; a rerun asks for them again. The report
reads the files that rate and compare wrote; a pair judged in one order only is left out of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lisendiff_jax.data.bundled import load_situations, sample_path
from lisendiff_jax.data.example import parse_dial
from lisendiff_jax.errors import UserError
from lisendiff_jax.evaluation.client import Client, Endpoint
from lisendiff_jax.evaluation.judge import compare, outcomes, rate
from lisendiff_jax.evaluation.report import ab_table, paired_table, ratings_chart, ratings_table
from lisendiff_jax.evaluation.simulate import simulate
from lisendiff_jax.evaluation.transcripts import ResultsFile


def _role(p: argparse.ArgumentParser, role: str) -> None:
    g = p.add_argument_group(role)
    g.add_argument(f"--{role}-url", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument(f"--{role}-model", required=True)
    g.add_argument(f"--{role}-key-env", default="OPENAI_API_KEY", help="API key variable")
    g.add_argument(f"--{role}-extra", type=json.loads, default={}, help="JSON object")


def _client(args: argparse.Namespace, role: str, **extra: object) -> Client:
    get = lambda name: getattr(args, f"{role}_{name}")
    endpoint = Endpoint(get("url"), get("model"), get("key_env"), {**get("extra"), **extra})
    return Client(endpoint, concurrency=args.workers, timeout_s=args.timeout)


def _listeners(args: argparse.Namespace) -> list[tuple[str, Client]]:
    """(system name, client) of each listener to simulate: --system, or one per --empathy."""
    if args.empathy is None:
        return [(args.system, _client(args, "listener"))]
    return [(f"{args.system}@w={w:g}", _client(args, "listener", empathy=w)) for w in args.empathy]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lisendiff_jax.evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, default=4, help="requests in flight per endpoint")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="speaker and listener conversations")
    _role(s, "speaker")
    _role(s, "listener")
    s.add_argument("--system", required=True, help="the listener's name in the results")
    s.add_argument(
        "--empathy",
        type=parse_dial,
        metavar="W,...",
        help="sweep our listener's empathy dial, e.g. 0,1,2 (one system per setting)",
    )
    s.add_argument(
        "--situations",
        type=Path,
        default=sample_path("situations"),
        help="JSONL file or folder of situations, in any language (default: the bundled ones)",
    )
    s.add_argument("--limit", type=int, help="only the first N situations")
    s.add_argument("--turns", type=int, default=3)
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("rate", help="0-10 ratings of one system's conversations")
    _role(r, "judge")
    r.add_argument("--transcripts", type=Path, required=True)
    r.add_argument("--system", help="only this system's transcripts")
    r.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="A/B of two systems, judged in both orders")
    _role(c, "judge")
    c.add_argument("--transcripts", type=Path, required=True)
    c.add_argument("--x", required=True)
    c.add_argument("--y", required=True)
    c.add_argument("--out", type=Path, required=True)
    rep = sub.add_parser("report", help="tables (Markdown) and the ratings chart (PNG)")
    rep.add_argument("--ratings", type=Path)
    rep.add_argument("--outcomes", type=Path)
    rep.add_argument("--x", help="with --y: a paired test of their ratings")
    rep.add_argument("--y")
    rep.add_argument("--out-dir", type=Path, required=True)
    return p


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return ResultsFile(path, ()).records


def _write(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")


def _judged(out: Path, results: list[dict], failures: list[dict]) -> None:
    _write(out.with_suffix(".failures.jsonl"), failures)
    print(f"{len(results)} judged, {len(failures)} unparseable or failed", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    if args.command == "simulate":
        situations = load_situations(args.situations)[: args.limit]
        speaker = _client(args, "speaker")
        for system, listener in _listeners(args):
            records = simulate(
                situations, speaker, listener, system, args.out, args.turns, args.workers
            )
            print(f"{len(records)} conversation(s) of {system} in {args.out}", file=sys.stderr)
    elif args.command in ("rate", "compare"):
        transcripts = _read(args.transcripts)
        of = lambda name: [t for t in transcripts if name in (None, t["system"])]
        judge = _client(args, "judge")
        if args.command == "rate":
            _judged(args.out, *rate(of(args.system), judge, args.workers, out=args.out))
        else:
            pairs = compare(of(args.x), of(args.y), judge, args.workers, out=args.out)
            _judged(args.out, *pairs)
    else:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if args.outcomes:
            judgments = _read(args.outcomes)
            missing = next(
                (
                    n
                    for n, j in enumerate(judgments, 1)
                    if not {"x", "y", "id", "order"} <= j.keys()
                ),
                None,
            )
            if missing is not None:
                raise ValueError(
                    f"{args.outcomes}: record {missing} is not an A/B judgment written by "
                    "`compare` (it lacks x, y, id or order); rerun compare into a new file"
                )
            pairs = outcomes(judgments)
            half = len({(j["x"], j["y"], j["id"]) for j in judgments}) - len(pairs)
            if half:
                print(
                    f"{half} pair(s) judged in one order only are left out; rerun compare",
                    file=sys.stderr,
                )
            (args.out_dir / "ab_table.md").write_text(ab_table(pairs) + "\n")
        if args.ratings:
            ratings = _read(args.ratings)
            (args.out_dir / "ratings.md").write_text(ratings_table(ratings) + "\n")
            ratings_chart(ratings, args.out_dir / "ratings.png")
            if args.x and args.y:
                paired = paired_table(ratings, args.x, args.y)
                (args.out_dir / "paired.md").write_text(paired + "\n")
        print(f"report in {args.out_dir}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (UserError, OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
