"""The results as the paper shows them: an A/B table like its Table 1 (win/lose/tie % per
metric and language, with a sign-test mark), rating means with confidence intervals and a
paired test between systems, and a bar chart of the ratings like its Figure 3."""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

from lisendiff_jax.evaluation.judge import METRICS
from lisendiff_jax.evaluation.stats import mean_ci, paired_test, sign_test, significance_mark


def ab_table(outcomes: Sequence[dict]) -> str:
    """A Markdown table of `judge.compare` outcomes: one row per language and system pair, and
    per metric "win/lose/tie" in % of the pairs, marked * (p < 0.05) or ** (p < 0.01) when
    the sign test of wins against losses is significant."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for o in outcomes:
        groups[(o["lang"], o["x"], o["y"])].append(o)
    lines = [
        "| lang | X vs Y | n | " + " | ".join(METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for (lang, x, y), rows in sorted(groups.items()):
        cells = []
        for metric in METRICS:
            count = collections.Counter(r["outcomes"][metric] for r in rows)
            win, lose, tie = (100 * count[k] / len(rows) for k in ("win", "lose", "tie"))
            mark = significance_mark(sign_test(count["win"], count["lose"]))
            cells.append(f"{win:.0f}/{lose:.0f}/{tie:.0f}{mark}")
        lines.append(f"| {lang} | {x} vs {y} | {len(rows)} | " + " | ".join(cells) + " |")
    lines.append("\nCells: win/lose/tie % of X against Y; * p < 0.05, ** p < 0.01 (sign test).")
    return "\n".join(lines)


def _scores(ratings: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """system -> metric -> situation id -> score."""
    table: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
    for r in ratings:
        for metric, score in r["scores"].items():
            table[r["system"]][metric][r["id"]] = score
    return table


def ratings_table(ratings: Sequence[dict]) -> str:
    """A Markdown table of each system's mean rating per metric with its 95% interval."""
    scores = _scores(ratings)
    lines = ["| system | n | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for system, by_metric in sorted(scores.items()):
        cells = []
        for metric in METRICS:
            ci = mean_ci(list(by_metric[metric].values()))
            cells.append(f"{ci.mean:.2f} [{ci.low:.2f}, {ci.high:.2f}]")
        n = len(by_metric[next(iter(METRICS))])
        lines.append(f"| {system} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(ratings: Sequence[dict], x: str, y: str) -> str:
    """A Markdown table of the paired t-test of x's ratings against y's, per metric, on the
    situations both were rated on."""
    scores = _scores(ratings)
    lines = ["| metric | n | mean x - y | t | p |", "|---|---|---|---|---|"]
    for metric in METRICS:
        sx, sy = scores[x][metric], scores[y][metric]
        shared = sorted(sx.keys() & sy.keys())
        if len(shared) < 2:
            lines.append(f"| {metric} | {len(shared)} | - | - | - |")
            continue
        test = paired_test([sx[i] for i in shared], [sy[i] for i in shared])
        mark = significance_mark(test.p)
        lines.append(
            f"| {metric} | {test.n} | {test.mean_difference:+.2f} | {test.t:.2f} | "
            f"{test.p:.3g}{mark} |"
        )
    return "\n".join(lines)


def ratings_chart(ratings: Sequence[dict], path: str | os.PathLike) -> None:
    """A PNG of grouped bars: per metric, each system's mean rating with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt
    import numpy as np

    scores = _scores(ratings)
    systems = sorted(scores)
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, system in enumerate(systems):
        cis = [mean_ci(list(scores[system][m].values())) for m in METRICS]
        means = np.array([c.mean for c in cis])
        errors = np.array([[c.mean - c.low for c in cis], [c.high - c.mean for c in cis]])
        positions = np.arange(len(METRICS)) + i * width
        ax.bar(positions, means, width, yerr=errors, capsize=2, label=system)
    ax.set_xticks(np.arange(len(METRICS)) + width * (len(systems) - 1) / 2, list(METRICS))
    ax.set_ylim(0, 10)
    ax.set_ylabel("judge rating (0-10)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
