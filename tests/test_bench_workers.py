"""benchmarks/workers.py: a benchmark worker goes down with every process it started (a vLLM
engine core left alive holds the GPU and sinks every engine after it)."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.workers import run_worker  # noqa: E402

SPAWN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
open(sys.argv[1], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")  # a zombie waiting for its reaper is gone for our purpose


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_timed_out_worker_takes_its_children_down(tmp_path):
    pid_file = tmp_path / "child.pid"
    res = run_worker([sys.executable, "-c", SPAWN, str(pid_file), "120"], timeout=5)
    assert res.timed_out and res.returncode is None and "TIMEOUT" in res.stderr and "started" in res.stdout
    assert _wait_gone(int(pid_file.read_text()))


def test_a_finished_worker_leaves_no_straggler(tmp_path):
    pid_file = tmp_path / "child.pid"
    res = run_worker([sys.executable, "-c", SPAWN, str(pid_file), "0"], timeout=60)
    assert res.returncode == 0 and not res.timed_out and res.stdout.strip() == "started"
    assert _wait_gone(int(pid_file.read_text()))


def test_gpu_parity_compares_teacher_forced_logprobs_position_by_position():
    """gpu_parity's scored texts: vLLM's prompt log-probs (None first, then {token: Logprob}) to
    [log-prob of the text's token, most likely token] rows, and two modes' rows compared."""
    from types import SimpleNamespace as Lp

    from benchmarks.gpu_parity import compare_scored, position_logprobs

    rows = position_logprobs([1, 5, 7], [None, {5: Lp(logprob=-0.1, rank=1)},
                                         {7: Lp(logprob=-2.0, rank=3), 9: Lp(logprob=-0.5, rank=1)}])
    assert rows == [[-0.1, 5], [-2.0, 9]]
    got = compare_scored([rows], [[[-0.1, 5], [-2.5, 7]]])
    assert got == {"positions": 2, "top1_agree": 0.5, "max_abs_logprob_gap": 0.5, "mean_abs_logprob_gap": 0.25}
    assert compare_scored(None, [rows]) is None
