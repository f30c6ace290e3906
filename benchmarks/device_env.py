"""Make this checkout's `vllm_zeda` visible as an installed distribution on the device machine.

The GPU bundle has no pip-installed vllm-zeda, but vLLM finds plugins through entry points
(in every engine and worker process). This writes a minimal dist-info (METADATA +
entry_points.txt, read from pyproject.toml) into DIR; put DIR and the repo root on PYTHONPATH.

    python3 benchmarks/device_env.py /tmp/zeda_meta
"""
import sys
import tomllib
from pathlib import Path

root = Path(__file__).resolve().parents[1]
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
out = Path(sys.argv[1]) / f"vllm_zeda-{project['version']}.dist-info"
out.mkdir(parents=True, exist_ok=True)
(out / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm-zeda\nVersion: {project['version']}\n")
lines = []
for group, eps in project.get("entry-points", {}).items():
    lines.append(f"[{group}]")
    lines += [f"{name} = {target}" for name, target in eps.items()]
    lines.append("")
(out / "entry_points.txt").write_text("\n".join(lines))
print(f"wrote {out}")
