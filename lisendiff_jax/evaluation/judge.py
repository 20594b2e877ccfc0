"""An LLM judge: ratings of one listener's conversations, and A/B comparisons of two listeners
on the same situations (the paper's section 4.6 and appendix C, in our own wording).

Judge replies are parsed leniently: a JSON object anywhere in the reply, or else lines such
as "Empathy: 7/10" or "**inquiring** - B". A reply that gives no valid answer for every
metric is asked again (with another seed) up to `attempts` times and then reported as a
failure with the last reply; it never counts as a score.

A/B: each pair is judged twice, once in each order, so that a judge's liking for the first
(or second) position cancels out; a metric counts as a win only when both orders pick the
same system, and anything else (a tie in either order, or the two orders disagreeing) is a
tie.

Resuming: every judgment (the rating of one conversation, or one order of one A/B pair) is
appended to a JSONL file the moment it is made (`transcripts.ResultsFile`: one whole, synced
line each; a line torn by a kill is dropped). A run on the same file asks the judge only for
the judgments not in it, so an interrupted run loses and repeats none.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from lisendiff_jax.data.languages import language_name
from lisendiff_jax.evaluation.client import Chat
from lisendiff_jax.evaluation.jobs import run_jobs
from lisendiff_jax.evaluation.transcripts import ResultsFile

# metric: (what it measures, low 0-3, moderate 4-6, high 7-10)
METRICS: Mapping[str, tuple[str, str, str, str]] = {
    "empathy": (
        "how well the listener grasps and shares what the speaker feels",
        "misses or brushes past the speaker's feelings",
        "acknowledges the feelings in general terms",
        "names the feelings precisely and makes the speaker feel understood",
    ),
    "emotional": (
        "the warmth, care and concern the listener expresses",
        "cold, flat or mechanical",
        "polite and kind but generic",
        "clearly warm and caring, in words fitted to this speaker",
    ),
    "suggesting": (
        "whether the listener offers useful ideas or next steps where they help",
        "no suggestion, or unhelpful or pushy ones",
        "some sensible but generic advice",
        "concrete, fitting suggestions offered gently",
    ),
    "inquiring": (
        "whether the listener asks questions that help the speaker open up",
        "asks nothing, or irrelevant questions",
        "asks a general question or two",
        "asks specific, caring questions that invite the speaker to say more",
    ),
    "interpreting": (
        "whether the listener reflects the speaker's experience back in its own words",
        "repeats or misreads what was said",
        "paraphrases the surface of what was said",
        "shows it understood what the experience means to the speaker",
    ),
    "engaged": (
        "whether the listener stays with the speaker and keeps the conversation going",
        "off topic, curt or ends the exchange",
        "stays on topic but without much involvement",
        "attentive throughout, building on each of the speaker's turns",
    ),
    "insightful": (
        "whether the listener brings a helpful perspective the speaker had not voiced",
        "nothing beyond what the speaker said",
        "a common-sense remark",
        "a fresh, thoughtful view that helps the speaker see the situation anew",
    ),
}
Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "lose", "tie"]
Order = Literal["xy", "yx"]  # which system is shown as A
ORDERS: tuple[Order, ...] = ("xy", "yx")
T = TypeVar("T")


class JudgeParseError(ValueError):
    """A judge reply that does not answer every metric."""


class JudgeFailure(RuntimeError):
    """No parseable reply after every attempt; `reply` is the last one."""

    def __init__(self, message: str, reply: str):
        super().__init__(message)
        self.reply = reply


def _rubric() -> str:
    return "\n".join(
        f"- {name}: {what}. Low (0-3): {low}. Moderate (4-6): {mid}. High (7-10): {high}."
        for name, (what, low, mid, high) in METRICS.items()
    )


def render(transcript: Sequence[dict]) -> str:
    return "\n".join(f"{t['role'].capitalize()}: {t['text']}" for t in transcript)


def _language(lang: str) -> str:
    """What tells the judge the conversation's language."""
    name = language_name(lang)
    return (
        f"The speaker speaks {name} and the listener is meant to reply in {name}; read them "
        f"as a fluent {name} speaker would. "
    )


def rating_messages(transcript: Sequence[dict], lang: str) -> list[dict]:
    system = (
        "You evaluate a listener's replies in a conversation with a person who shares an "
        "emotional experience. "
        + _language(lang)
        + "Judge only the listener, on these metrics:\n"
        + _rubric()
        + "\nAnswer with one JSON object mapping every metric to an integer from 0 to 10, "
        'e.g. {"empathy": 6, ...}, and nothing else.'
    )
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "Conversation:\n" + render(transcript)},
    ]


def comparison_messages(a: Sequence[dict], b: Sequence[dict], lang: str) -> list[dict]:
    system = (
        "You compare two listeners, A and B, each talking with a person who shares the same "
        "emotional experience. "
        + _language(lang)
        + "For every metric below, say which listener does better, or tie:\n"
        + _rubric()
        + '\nAnswer with one JSON object mapping every metric to "A", "B" or "tie", and '
        "nothing else."
    )
    user = f"Conversation A:\n{render(a)}\n\nConversation B:\n{render(b)}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _json_objects(text: str) -> list[dict]:
    """Every JSON object embedded in `text` (e.g. inside a ```json fence or after prose)."""
    decoder, found = json.JSONDecoder(), []
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append({str(k).strip().lower(): v for k, v in value.items()})
    return found


def _parse(text: str, value: Callable[[Any], T | None], pattern: str) -> dict[str, T]:
    """Every metric's value from the first JSON object that has them all, else from text lines
    "<metric> <separators> <value>"; `value` turns a raw answer into a valid one or None."""
    for obj in _json_objects(text):
        values = {m: value(obj.get(m)) for m in METRICS}
        if all(v is not None for v in values.values()):
            return values  # type: ignore[return-value]
    values, missing = {}, []
    for metric in METRICS:
        match = re.search(rf"\b{metric}\b[\W_]{{0,6}}{pattern}", text, re.IGNORECASE)
        parsed = value(match.group(1)) if match else None
        if parsed is None:
            missing.append(metric)
        values[metric] = parsed
    if missing:
        raise JudgeParseError(f"no valid answer for {', '.join(missing)}")
    return values


def _score(raw: Any) -> float | None:
    if isinstance(raw, dict):  # {"score": 7, "reason": ...}
        raw = raw.get("score")
    if isinstance(raw, bool):
        return None
    try:
        score = float(raw)
    except (TypeError, ValueError):
        return None
    return score if 0 <= score <= 10 else None


def _verdict(raw: Any) -> Verdict | None:
    if not isinstance(raw, str):
        return None
    word = raw.strip().strip("*\"'.").lower()
    return {"a": "A", "b": "B", "tie": "tie", "equal": "tie", "draw": "tie"}.get(word)


def parse_ratings(text: str) -> dict[str, float]:
    """A 0-10 score per metric from a judge reply; JudgeParseError if any is missing."""
    return _parse(text, _score, r"(\d+(?:\.\d+)?)(?:\s*/\s*10)?")


def parse_verdicts(text: str) -> dict[str, Verdict]:
    """ "A", "B" or "tie" per metric from a judge reply; JudgeParseError if any is missing."""
    return _parse(text, _verdict, r"(A|B|tie|equal|draw)\b")


def ask(
    judge: Chat,
    messages: list[dict],
    parse: Callable[[str], T],
    attempts: int = 3,
    sampling: Mapping[str, Any] = {},
) -> T:
    """The parsed reply of `judge`, asking again with seed 0, 1, ... while it cannot be parsed;
    JudgeFailure with the last reply after `attempts` tries."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    reply = ""
    for attempt in range(attempts):
        reply = judge.complete(messages, **{**sampling, "seed": attempt})
        try:
            return parse(reply)
        except JudgeParseError as err:
            error = err
    raise JudgeFailure(f"unparseable after {attempts} attempt(s): {error}", reply)


def combine(first: Mapping[str, Verdict], second: Mapping[str, Verdict]) -> dict[str, Outcome]:
    """X's outcome per metric, from `first` (X shown as A) and `second` (X shown as B): a win
    or a loss needs both orders to agree; everything else is a tie."""
    outcomes: dict[str, Outcome] = {}
    for metric in METRICS:
        pair = (first[metric], second[metric])
        outcomes[metric] = "win" if pair == ("A", "B") else "lose" if pair == ("B", "A") else "tie"
    return outcomes


def _judge(
    jobs: Mapping[tuple, Callable[[], dict]],
    results: ResultsFile,
    workers: int,
    fields: tuple[str, ...],
) -> list[dict]:
    """Runs the `jobs` whose key is not in `results` yet, appending each judgment to it the
    moment it is made; returns the failures, in key order. A failure record holds the key's
    `fields`, the error and, for a judge that never gave a parseable reply, that reply."""
    done = results.done()

    def judged(job: Callable[[], dict]) -> Callable[[], None]:
        return lambda: results.append(job())

    todo = {key: judged(job) for key, job in jobs.items() if key not in done}
    _, errors = run_jobs(todo, workers)
    failures = []
    for key, err in sorted(errors.items()):
        failure = {**dict(zip(fields, key, strict=True)), "error": str(err) or repr(err)}
        if isinstance(err, JudgeFailure):
            failure["reply"] = err.reply
        failures.append(failure)
    return failures


RATING_KEY = ("system", "id")
COMPARISON_KEY = ("x", "y", "id", "order")


def rate(
    transcripts: Sequence[dict],
    judge: Chat,
    workers: int = 4,
    attempts: int = 3,
    sampling: Mapping[str, Any] = {},
    out: str | os.PathLike | None = None,
) -> tuple[list[dict], list[dict]]:
    """(ratings, failures) of the transcripts, in (system, id) order; a rating record holds
    id, system, lang and the metric scores. `sampling` goes with every judge request. With
    `out`, every rating is appended to that JSONL file as soon as it is made, and the ones
    already there are not asked again, so an interrupted run resumes where it stopped."""
    results = ResultsFile(out, RATING_KEY)

    def job(t: dict) -> Callable[[], dict]:
        def run() -> dict:
            messages = rating_messages(t["turns"], t["lang"])
            scores = ask(judge, messages, parse_ratings, attempts, sampling)
            return {"id": t["id"], "system": t["system"], "lang": t["lang"], "scores": scores}

        return run

    jobs = {(t["system"], t["id"]): job(t) for t in transcripts}
    failures = _judge(jobs, results, workers, RATING_KEY)
    ratings = {results.key(r): r for r in results.records if results.key(r) in jobs}
    return [ratings[key] for key in sorted(ratings)], failures


def compare(
    x: Sequence[dict],
    y: Sequence[dict],
    judge: Chat,
    workers: int = 4,
    attempts: int = 3,
    sampling: Mapping[str, Any] = {},
    out: str | os.PathLike | None = None,
) -> tuple[list[dict], list[dict]]:
    """(outcomes, failures) of system x against system y on the situations both have; an
    outcome record holds id, lang, the two systems and X's win/lose/tie per metric.

    Each order is one judgment: a record of id, lang, x, y, `order` ("xy": X shown as A;
    "yx": X shown as B) and the judge's verdicts. With `out`, every judgment is appended to
    that JSONL file as soon as it is made and the ones already there are not asked again;
    `outcomes` turns the file's judgments into outcomes."""
    results = ResultsFile(out, COMPARISON_KEY)
    ys = {t["id"]: t for t in y}

    def job(tx: dict, ty: dict, order: Order) -> Callable[[], dict]:
        a, b = (tx, ty) if order == "xy" else (ty, tx)

        def run() -> dict:
            messages = comparison_messages(a["turns"], b["turns"], tx["lang"])
            verdicts = ask(judge, messages, parse_verdicts, attempts, sampling)
            return {
                "id": tx["id"],
                "lang": tx["lang"],
                "x": tx["system"],
                "y": ty["system"],
                "order": order,
                "verdicts": verdicts,
            }

        return run

    jobs = {
        (tx["system"], ys[tx["id"]]["system"], tx["id"], order): job(tx, ys[tx["id"]], order)
        for tx in x
        if tx["id"] in ys
        for order in ORDERS
    }
    failures = _judge(jobs, results, workers, COMPARISON_KEY)
    return outcomes([r for r in results.records if results.key(r) in jobs]), failures


def outcomes(judgments: Sequence[dict]) -> list[dict]:
    """The outcome records ({id, lang, x, y, outcomes}, in (x, y, id) order) of the pairs
    whose both orders are among `judgments` (records written by `compare`); a pair judged in
    one order only is left out."""
    orders: dict[tuple, dict[str, dict]] = {}
    for j in judgments:
        orders.setdefault((j["x"], j["y"], j["id"]), {})[j["order"]] = j
    return [
        {
            "id": by_order["xy"]["id"],
            "lang": by_order["xy"]["lang"],
            "x": by_order["xy"]["x"],
            "y": by_order["xy"]["y"],
            "outcomes": combine(by_order["xy"]["verdicts"], by_order["yx"]["verdicts"]),
        }
        for _, by_order in sorted(orders.items())
        if by_order.keys() == set(ORDERS)
    ]
