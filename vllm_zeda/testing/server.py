"""Start and stop a real `vllm serve` process (used by the quickstart and the tests).

The server runs in its own process group, so stopping it (also on Ctrl-C or a failed test)
takes its engine and worker processes with it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CPU_DEFAULTS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """`vllm` if its console script works here, else the module entry point."""
    exe = shutil.which("vllm", path=str(Path(sys.executable).parent))
    if exe:
        probe = subprocess.run([exe, "--version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [exe]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class VllmServer:
    def __init__(self, model: str | Path, *args: str, port: int | None = None, log_path: str | Path | None = None,
                 env: dict | None = None, startup_timeout: float = 600.0):
        self.model = str(model)
        self.port = port or free_port()
        self.args = list(args)
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/vllm-zeda-server-{self.port}.log")
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [*vllm_command(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self) -> "VllmServer":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if self.get("/health", timeout=2)[0] == 200:
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        try:  # leftovers of the group (engine core, workers)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.status, r.read()

    def post(self, path: str, payload: dict | bytes, timeout: float = 120) -> tuple[int, dict]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except json.JSONDecodeError:
                return e.code, {"raw": body.decode(errors="replace")}

    def stats(self) -> dict:
        return json.loads(self.get("/v1/zeda/stats")[1])
