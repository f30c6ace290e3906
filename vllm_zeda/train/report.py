"""The trainer's closing report: zeda_report.json and a PNG of per-layer skip rates and losses."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPORT = "zeda_report.json"
PLOT = "zeda_report.png"
METRICS = "metrics.jsonl"


def write_report(out_dir: Path, report: dict) -> Path:
    path = out_dir / REPORT
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def throughput(step_seconds: list[float], tokens_per_step: int, processes: int) -> dict:
    """Training speed of one stage from its optimizer steps' wall times. The first step is left
    out when there are others (CUDA/Triton warm-up, allocator growth); tokens count every
    process's blocks, so tokens_per_s is the whole job's and tokens_per_s_per_process its share."""
    timed = step_seconds[1:] if len(step_seconds) > 1 else list(step_seconds)
    seconds = sum(timed)
    rate = len(timed) * tokens_per_step / seconds if seconds > 0 else None
    return {"steps_timed": len(timed), "seconds": round(seconds, 4), "tokens_per_step": tokens_per_step,
            "tokens_per_s": None if rate is None else round(rate, 1),
            "tokens_per_s_per_process": None if rate is None else round(rate / processes, 1)}


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plotting_available() -> bool:
    """matplotlib is optional (the `plot` extra): without it the report is written without its PNG."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(out_path: Path, report: dict, metrics: list[dict]) -> Path:
    """Left: zero fraction per layer (after injection, after training, target). Right: losses."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    layers = [d["layer"] for d in report["layers"]]
    width = 0.4
    before = report.get("after_injection", {}).get("layers")
    if before:
        ax_l.bar([x - width / 2 for x in layers], [d["zero_fraction"] for d in before], width, label="after injection")
    ax_l.bar([x + width / 2 for x in layers], [d["zero_fraction"] for d in report["layers"]], width, label="trained")
    ax_l.axhline(report["target_zero_fraction"], color="k", ls="--", lw=1, label="target")
    ax_l.set(xlabel="layer", ylabel="zero-expert slot fraction (held-out)", ylim=(0, 1), title="skip rate per layer")
    ax_l.set_xticks(layers if len(layers) <= 16 else layers[:: max(1, len(layers) // 12)])
    ax_l.legend(fontsize=8)

    # one x axis over both stages: stage 2 steps follow stage 1's
    offset = {1: 0, 2: report.get("stage1_steps", 0)}
    train = [m for m in metrics if m.get("event") == "train"]
    evals = [m for m in metrics if m.get("event") == "eval"]
    if train:
        xs = [offset[m["stage"]] + m["step"] for m in train]
        ax_r.plot(xs, [m["loss"] for m in train], lw=1, label="train loss (KL + balance)")
        ax_r.plot(xs, [m["kl"] for m in train], lw=1, label="train KL")
    if evals:
        ax_r.plot([offset[m["stage"]] + m["step"] for m in evals], [m["teacher_kl"] for m in evals], "o-", label="held-out KL")
    if report.get("stage1_steps") and report.get("stage2_steps"):
        ax_r.axvline(report["stage1_steps"], color="gray", ls=":", lw=1)
    ax_r.set(xlabel="optimizer step (stage 1, then stage 2)", ylabel="nats / token", title="losses")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
