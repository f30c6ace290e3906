"""Run one benchmark worker process, and take every process it started down with it.

A vLLM engine runs in a child of the worker (EngineCore) and holds its GPU memory. Killing the
worker alone on a timeout (what `subprocess.run(timeout=)` does) leaves that child alive and the
next engine on the GPU fails with "Free memory on device ... is less than desired" (seen on the
H100, 2026-11-24: one timed-out config sank the two after it). So the worker starts its own
process group, and the whole group is killed when it times out and once it has exited.
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass


@dataclass
class WorkerResult:
    returncode: int | None  # None: killed on the timeout
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_worker(cmd: list[str], timeout: float, **popen_kwargs) -> WorkerResult:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`, process group and all."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        err, code = err + "\nTIMEOUT", None
    _kill_group(proc.pid)  # stragglers of a worker that exited (an engine core that outlived it)
    return WorkerResult(code, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
