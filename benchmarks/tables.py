"""Markdown tables for benchmarks/RESULTS.md from the JSON the device scripts write.

    python3 benchmarks/tables.py layer benchmarks/results/moe_layer_h100_2026-11-23c.json
    python3 benchmarks/tables.py e2e benchmarks/results/e2e_h100_2026-11-23_b.json
"""
from __future__ import annotations

import json
import sys

IDEAL_FOR = {"zeda_s50": "ideal4", "zeda_s75": "ideal2"}


def layer(data: dict) -> str:
    rows = data["rows"]
    has_map = "stock_map" in rows[0]
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        head = ["tokens", "skip", "static", "ours"] + (["stock map"] if has_map else []) + \
               ["remap→0", "ideal", "ours/static", "ours/ideal", "ours/remap", "max diff vs remap"]
        out += [f"**{shape}** (µs per call)", "", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for r in (r for r in rows if r["shape"] == shape):
            cells = [r["tokens"], f"{r['skip']:.2f}", r["static"], r["ours"]] + ([r["stock_map"]] if has_map else []) + \
                    [r["remap"], r["ideal"], f"{r['ours/static']:.3f}", f"**{r['ours/ideal']:.3f}**",
                     f"{r['ours/remap']:.3f}", f"{r['ours_vs_remap_maxdiff']:.0e}"]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def e2e(data: dict) -> str:
    configs = data["configs"]
    base = configs["static8"]["workloads"]
    names = list(base)
    out = ["| config | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for name, r in configs.items():
        cells = []
        for w in names:
            e = r["workloads"][w]
            cell = f"{e['tok_per_s']:,.1f} ({e['tok_per_s'] / base[w]['tok_per_s']:.3f}x)"
            if "zero_fraction" in e:
                cell += f" z={e['zero_fraction']:.2f}"
            cells.append(cell)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "Share of the ideal's gain reached, (ours - static) / (ideal - static):", "",
            "| config | ideal | " + " | ".join(names) + " |", "| --- | --- |" + " ---: |" * len(names)]
    for name, ideal in IDEAL_FOR.items():
        if name in configs and ideal in configs:
            cells = []
            for w in names:
                gain = configs[name]["workloads"][w]["tok_per_s"] / base[w]["tok_per_s"] - 1
                ideal_gain = configs[ideal]["workloads"][w]["tok_per_s"] / base[w]["tok_per_s"] - 1
                cells.append(f"{gain / ideal_gain:.0%}" if abs(ideal_gain) > 0.02 else f"n/a (ideal {ideal_gain:+.1%})")
            out.append(f"| {name} | {ideal} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    print({"layer": layer, "e2e": e2e}[kind](json.load(open(path))))
