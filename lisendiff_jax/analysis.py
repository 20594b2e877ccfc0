"""Looking inside the latent space: a t-SNE map of sampled latents, response retrieval, and
where the empathy dial moves a latent.

    python -m lisendiff_jax.analysis map --workdir runs/llama_ja --workdir runs/llama_en \
        --out latents.png                       # the paper's Figure 5
    python -m lisendiff_jax.analysis map --workdir runs/llama_ja --empathy 0,0.5,1,2 \
        --out dial.png                          # latents along the empathy dial
    python -m lisendiff_jax.analysis retrieve --workdir runs/llama_ja \
        --candidates responses.txt --top-k 5    # the paper's Table 3
    python -m lisendiff_jax.analysis dial --workdir runs/llama_ja --empathy 0,0.5,1,1.5,2

Latents are sampled for the bundled Mandarin and Cantonese situations (or `--situations FILE`)
with each style's denoiser, or with `--empathy W,...` at each setting w of the empathy dial
(0: the default style, 1: the empathy style, 2: past it). On the map, colour is the model (its
L2) and the marker the style or the dial setting.
Retrieval ranks candidate responses (one per line) by the sum of their cosine similarities to
a model's sampled latents, with the candidates embedded by that run's own S-Encoder.
`dial` places the latents sampled at each setting of the dial on the empathy direction of the
run's own training latents: 0 at the mean latent of its default-style replies, 1 at the mean of
its empathy-style replies (`dial_positions`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lisendiff_jax.data import STYLES, load_situations, sample_path
from lisendiff_jax.data.example import parse_dial
from lisendiff_jax.errors import UserError

DEFAULT_SITUATIONS = ("situations/zh_mandarin.jsonl", "situations/zh_cantonese.jsonl")
_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def tsne_points(latents: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates [n, 2] of latents [n, d] (cosine distance, as the encoder's)."""
    from sklearn.manifold import TSNE

    n = latents.shape[0]
    if n < 3:
        raise UserError(f"a latent map needs at least 3 latents, got {n}")
    perplexity = min(30.0, (n - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, metric="cosine", init="random", random_state=seed)
    return tsne.fit_transform(np.asarray(latents, np.float64))


def plot_latent_map(
    points: np.ndarray, systems: Sequence[str], styles: Sequence[str], out: Path
) -> Path:
    """A scatter PNG of points [n, 2]: colour by system, marker by style (or dial setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for i, system in enumerate(dict.fromkeys(systems)):
        for j, style in enumerate(dict.fromkeys(styles)):
            keep = [a == system and b == style for a, b in zip(systems, styles, strict=True)]
            if any(keep):
                xy = points[np.asarray(keep)]
                ax.scatter(
                    xy[:, 0],
                    xy[:, 1],
                    c=f"C{i}",
                    marker=_MARKERS[j % len(_MARKERS)],
                    s=18,
                    alpha=0.8,
                    label=f"{system} / {style}",
                )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Sampled latents (t-SNE)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def retrieval_scores(latents: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Sum over latents [m, d] of each candidate's [k, d] cosine similarity: scores [k]."""

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return (unit(np.asarray(candidates, np.float64)) @ unit(np.asarray(latents, np.float64)).T).sum(
        axis=1
    )


def top_k(texts: Sequence[str], scores: np.ndarray, k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(texts[i], float(scores[i])) for i in order]


def sampled_latents(
    listener,
    situations: Sequence[str],
    samples: int,
    seed: int,
    empathy: Sequence[float] | None = None,
) -> dict:
    """{style: latents [len(situations) * samples, d]} from one model, or with `empathy`
    {"w=W": latents} at each setting of the dial."""
    from lisendiff_jax.infer.inference import Options, Request

    if empathy is None:
        settings = {style: dict(style=style) for style in STYLES}
    else:
        settings = {f"w={w:g}": dict(empathy=w) for w in empathy}
    out = {}
    for label, setting in settings.items():
        requests = [Request(context=(s,), **setting) for s in situations]
        rows = []
        for i in range(samples):
            replies = listener.reply(requests, Options(seed=seed + i, max_tokens=1))
            rows.extend(r.latent.reshape(-1) for r in replies)
        out[label] = np.stack(rows)
    return out


def style_means(workdir: str | Path) -> dict[str, np.ndarray]:
    """{style: the mean latent [d] of the run's training replies of that style}, read from the
    workdir's encoded training split."""
    from lisendiff_jax.data.encoder_cache import load_split

    folder = Path(workdir) / "data" / "train"
    try:
        split = load_split(folder)
    except FileNotFoundError:
        raise UserError(
            f"{workdir}: no training split in {folder} (an exported folder has none; give the "
            "training workdir)"
        ) from None
    latents = split.response_latents[:, 0]  # [N, d]
    means = {}
    for i, style in enumerate(STYLES):
        rows = np.asarray(split.style_id) == i
        if not rows.any():
            raise UserError(f"{workdir}: no {style}-style replies in its training data")
        means[style] = latents[rows].mean(axis=0)
    return means


def dial_positions(latents: np.ndarray, default: np.ndarray, empathy: np.ndarray) -> np.ndarray:
    """Each latent's coordinate [n] along the line from the default-style mean [d] (0) to the
    empathy-style mean [d] (1): its projection onto that direction, in units of the distance
    between the two means."""
    direction = np.asarray(empathy, np.float64) - default
    offset = np.asarray(latents, np.float64) - default
    return offset @ direction / (direction @ direction)


def dial_table(workdir: str, by_setting: dict[str, np.ndarray]) -> str:
    """Per dial setting ("w=W": latents [n, d]), the latents' mean position on the run's
    empathy direction with its 5th-95th percentiles, and their mean cosine to each style mean."""
    means = style_means(workdir)
    lines = [
        f"{workdir}: position from the default-style mean (0) to the empathy-style mean (1) of",
        "its training latents, and the mean cosine to each",
        f"{'w':>6} {'position':>9} {'5%-95%':>14} {'cos default':>12} {'cos empathy':>12}",
    ]
    for label, latents in by_setting.items():
        at = dial_positions(latents, means["default"], means["empathy"])
        low, high = np.percentile(at, [5, 95])
        cos = {k: retrieval_scores(latents, v[None])[0] / len(latents) for k, v in means.items()}
        lines.append(
            f"{label.removeprefix('w='):>6} {at.mean():9.3f} {f'{low:.2f} to {high:.2f}':>14} "
            f"{cos['default']:12.3f} {cos['empathy']:12.3f}"
        )
    return "\n".join(lines)


def _listener(workdir: str):
    from lisendiff_jax.infer.chat import load_model
    from lisendiff_jax.infer.inference import Listener

    model, config, tokenizer = load_model(Path(workdir), None)
    if not model.lisendiff:
        raise UserError(f"{workdir}: a LoRA-only run has no latent space to look at")
    return Listener(model, config, tokenizer), config


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lisendiff_jax.analysis", description=__doc__.splitlines()[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("map", "retrieve", "dial"):
        c = sub.add_parser(name)
        c.add_argument("--workdir", action="append", required=True, help="repeatable")
        c.add_argument("--situations", action="append", help="JSONL; default: bundled zh/yue")
        c.add_argument("--samples", type=int, default=2, help="latents per situation and style")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument(
            "--empathy",
            type=parse_dial,
            metavar="W,...",
            help="sample at these settings of the empathy dial (e.g. 0,1,2), not per style",
        )
    sub.choices["map"].add_argument("--out", type=Path, default=Path("latent_map.png"))
    sub.choices["retrieve"].add_argument("--candidates", type=Path, required=True)
    sub.choices["retrieve"].add_argument("--top-k", type=int, default=5)
    args = p.parse_args(argv)
    if args.command == "dial" and args.empathy is None:
        args.empathy = [0.0, 0.5, 1.0, 1.5, 2.0]
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # orbax logs at INFO and WARNING while restoring
    try:
        files = args.situations or [str(sample_path(f)) for f in DEFAULT_SITUATIONS]
        situations = [s.situation for f in files for s in load_situations(f)]
        points, systems, styles = [], [], []
        for workdir in args.workdir:
            listener, config = _listener(workdir)
            by_style = sampled_latents(listener, situations, args.samples, args.seed, args.empathy)
            if args.command == "dial":
                print(dial_table(workdir, by_style))
                continue
            if args.command == "retrieve":
                if not args.candidates.is_file():
                    raise UserError(f"{args.candidates}: no such file")
                texts = [t.strip() for t in args.candidates.read_text().splitlines() if t.strip()]
                if not texts:
                    raise UserError(f"{args.candidates}: no candidate responses")
                embedded = listener.encoder.encode(texts)
                for style, latents in by_style.items():
                    print(f"{workdir} / {style}:")
                    for text, score in top_k(
                        texts, retrieval_scores(latents, embedded), args.top_k
                    ):
                        print(f"  {score:8.3f}  {text}")
                continue
            for style, latents in by_style.items():
                points.append(latents)
                systems += [Path(workdir).name] * len(latents)
                styles += [style] * len(latents)
        if args.command == "map":
            xy = tsne_points(np.concatenate(points), args.seed)
            print(f"wrote {plot_latent_map(xy, systems, styles, args.out)}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
