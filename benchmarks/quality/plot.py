"""Quality against routed-expert FLOPs, from an `evaluate.py` JSON: one PNG, one panel per metric,
the share of K slots run ("kept", = routed-expert FLOPs against static top-K) on the x axis.

Each training-free baseline is a curve through its points (with the teacher at kept 1); each ZEDA
checkpoint is a curve through its `zero_bias` dial points, its trained point (no dial) starred.
Perplexity is relative to the teacher's; a baseline far off the scale (random dropping) is clipped
at the top and says so in its label.

    python benchmarks/quality/plot.py benchmarks/results/quality_testbed_h200_2026-12-05.json \
        --out benchmarks/results/quality_testbed_h200_2026-12-05.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# (JSON key, axis label, relative to the teacher)
METRICS = (("ppl_code", "code perplexity vs teacher (%)", True),
           ("code_next_token_acc", "code next-token accuracy (%)", False),
           ("math_exact_match", "math exact match (%)", False))
BASELINES = ("static_k", "top_p", "threshold", "random_drop")


def value(point: dict, key: str, teacher: dict, relative: bool) -> float:
    """A point's metric in percent: relative change against the teacher, or the share itself."""
    if relative:
        return 100.0 * (point[key] / teacher[key] - 1.0)
    return 100.0 * point[key]


def zeda_label(point: dict) -> str:
    """A ZEDA checkpoint's name in the legend: its training target, else its path."""
    target = point.get("target")
    return f"zeda T={target:g}" if target is not None else f"zeda {point.get('checkpoint', '')}"


def curves(points: list[dict], key: str, relative: bool) -> dict[str, list[tuple[float, float]]]:
    """{label: [(kept, value), ...] sorted by kept}: each baseline from the teacher's point down,
    each ZEDA checkpoint (by its target) through its dial points and trained point."""
    teacher = next(p for p in points if p["method"] == "teacher")
    out: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        if key not in p:
            continue
        if p["method"] in BASELINES:
            label = p["method"]
        elif p["method"] == "zeda":
            label = zeda_label(p)
        else:
            continue
        if label not in out and p["method"] in BASELINES:
            out[label] = [(1.0, value(teacher, key, teacher, relative))]
        out.setdefault(label, []).append((p["kept"], value(p, key, teacher, relative)))
    return {label: sorted(xy) for label, xy in out.items()}


def trained_points(points: list[dict], key: str, relative: bool) -> dict[str, tuple[float, float]]:
    """{label: (kept, value)} of each ZEDA checkpoint at its trained zero fraction (no dial)."""
    teacher = next(p for p in points if p["method"] == "teacher")
    return {zeda_label(p): (p["kept"], value(p, key, teacher, relative))
            for p in points if p["method"] == "zeda" and p.get("dial") is None and key in p}


def plot(result: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    metrics = [m for m in METRICS if all(m[0] in p for p in points)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.4), squeeze=False)
    axes = axes[0]
    for ax, (key, label, relative) in zip(axes, metrics):
        lines = curves(points, key, relative)
        in_range = [v for name, xy in lines.items() if name != "random_drop" for _, v in xy]
        lo, hi = min(in_range), max(in_range)
        pad = 0.08 * (hi - lo or 1.0)
        for name, xy in lines.items():
            xs, ys = zip(*xy)
            off = any(not lo - pad <= y <= hi + pad for y in ys)
            style = dict(marker="o", markersize=3, linewidth=1.2) if name.startswith("zeda") else \
                dict(marker="s", markersize=3, linewidth=1, linestyle="--")
            ax.plot(xs, ys, label=name + (" (off scale)" if off else ""), **style)
        trained = trained_points(points, key, relative)
        if trained:
            xs, ys = zip(*trained.values())
            ax.plot(xs, ys, marker="*", markersize=13, color="black", linestyle="none",
                    label="zeda, trained points (no dial)")
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(1.02, min(x for xy in lines.values() for x, _ in xy) - 0.03)  # fewer FLOPs to the right
        ax.set_xlabel("kept share of the K slots (routed-expert FLOPs vs static top-K)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="an evaluate.py JSON")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: the JSON's name, .png)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    result = json.loads(args.result.read_text())
    out = args.out or args.result.with_suffix(".png")
    plot(result, out, args.title or f"{args.result.stem} ({result.get('date', '')})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
