"""Math questions with answers from DeepMind's `mathematics_dataset` generator (PyPI 1.0.1), one
JSON object a line on stdout: {"module": ..., "question": ..., "answer": ...}.

It needs sympy 1.5 (later sympy lost `diophantine.base_solution_linear`), which torch's own sympy
cannot be, so `corpus.py` runs this file in a venv of its own. Deterministic in --seed.

    python math_questions.py --count 1000 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

# Short questions a small model can learn to answer: arithmetic, number facts, comparisons,
# rounding and one-step algebra, at the generator's "train-easy" difficulty.
MODULES = (
    ("arithmetic", "add_or_sub"), ("arithmetic", "mul"), ("arithmetic", "div"), ("arithmetic", "mixed"),
    ("numbers", "gcd"), ("numbers", "lcm"), ("numbers", "div_remainder"), ("numbers", "round_number"),
    ("numbers", "place_value"), ("numbers", "is_factor"), ("comparison", "pair"), ("comparison", "sort"),
    ("comparison", "kth_biggest"), ("algebra", "linear_1d"), ("polynomials", "evaluate"),
)
MAX_QUESTION, MAX_ANSWER = 160, 30  # the generator's own limits, tightened for 512-token blocks


def easy(range_):
    """The lowest third of each module's entropy range (the generator's `train-easy`)."""
    lo, hi = range_
    return lo, lo + (hi - lo) / 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":  # the generator iterates sets: fix str hashing
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    import numpy as np
    from mathematics_dataset.modules import modules

    random.seed(a.seed)
    np.random.seed(a.seed)
    tree = modules.train(easy)
    out = sys.stdout
    for n in range(a.count):
        group, name = MODULES[n % len(MODULES)]
        while True:
            problem = tree[group][name]()
            question, answer = str(problem.question), str(problem.answer)
            if len(question) <= MAX_QUESTION and len(answer) <= MAX_ANSWER:
                break
        out.write(json.dumps({"module": f"{group}__{name}", "question": question, "answer": answer}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
