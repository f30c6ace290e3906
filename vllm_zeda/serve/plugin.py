"""The `vllm.general_plugins` entry point: model registration and the `--enable-zeda` flag.

vLLM loads general plugins in every process, and in the API server while the argument parser
is built (`EngineArgs.add_cli_args` calls `load_general_plugins()` first), so wrapping
`add_cli_args` / `from_cli_args` here adds our flags to `vllm serve`. Settings travel in
`additional_config["zeda"]` (part of vLLM's config hash, visible in every worker). Python API:
`LLM(model, additional_config={"zeda": {"enabled": True, "zero_bias": 0.0}})`.
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from ..archs import ARCHS, RELEASE_ARCHITECTURES, RELEASE_MODEL_TYPES

logger = logging.getLogger("vllm.zeda")  # a child of vLLM's logger: its format and level

WORKER_EXTENSION = "vllm_zeda.serve.stats.ZedaWorkerExtension"
ENDPOINT_PLUGIN_NAME = "zeda_stats"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm import ModelRegistry

    for arch in ARCHS.values():
        ModelRegistry.register_model(arch.zeda_architecture, f"vllm_zeda.serve.models:{arch.zeda_architecture}")
    for name in RELEASE_ARCHITECTURES:
        ModelRegistry.register_model(name, f"vllm_zeda.serve.models:{name}")
    _register_hf_configs()
    from . import compat

    if not compat.recognise_zeda_model_types({**{a.zeda_model_type: a.base_model_type for a in ARCHS.values()},
                                              **RELEASE_MODEL_TYPES}):
        logger.warning("[zeda] this vLLM has no model-type check for MLA attention to extend: ZEDA checkpoints of "
                       "MLA models (GLM-4.7-Flash, DeepSeek-V3) may not get MLA attention")
    _wrap_engine_args()


def _register_hf_configs() -> None:
    """vLLM reads config.json through transformers' AutoConfig: our model types must be known."""
    try:
        from ..hf.modeling import register

        register()
    except Exception as exc:  # a broken transformers must not take the server down with it
        logger.warning("[zeda] could not register transformers classes: %s", exc)


def _wrap_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, "_zeda", False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        group = parser.add_argument_group("ZEDA", "zero-expert dynamic MoE routing (vllm-zeda)")
        group.add_argument("--enable-zeda", action="store_true", default=False,
                           help="route over real + zero experts (dynamic K); without it a ZEDA checkpoint "
                                "runs masked (its original static top-K)")
        group.add_argument("--zeda-zero-bias", type=float, default=0.0,
                           help="added to the zero experts' router logits: > 0 skips more experts (default 0)")
        group.add_argument("--zeda-zero-slots", choices=("auto", "skip", "gather", "remap"), default="auto",
                           help="how zero slots reach the fused MoE: skip (expert map; GPU default), gather "
                                "(run only live slots; CPU default, above --zeda-gather-min-tokens) or remap "
                                "to expert 0 with weight 0 (exact, no saving)")
        group.add_argument("--zeda-gather-min-tokens", type=int, default=None,
                           help="gather mode: batch size (tokens) from which live slots are gathered; "
                                "below it zero slots are remapped (default: measured CPU crossover)")
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        if hasattr(args, "enable_zeda"):  # our parser built these args (vllm serve)
            apply_cli_settings(engine_args, args)
        return engine_args

    add_cli_args._zeda = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


def apply_cli_settings(engine_args, args) -> None:
    """Check a ZEDA checkpoint before the engine starts (one clear line instead of a worker
    traceback), carry the settings, and with --enable-zeda switch on the statistics and CUDA
    graphs for mixed steps (cuda_graphs.py)."""
    from . import compat
    from ..errors import ZedaError
    from ..convert.preflight import check_checkpoint
    from ..convert.checkpoint import load_config, quantization
    from .checks import check_parallel_layout, check_quantization, zero_slot_mode

    enabled = bool(getattr(args, "enable_zeda", False))
    try:
        load_format = getattr(engine_args, "load_format", "auto")
        spec = check_checkpoint(engine_args.model, require_zero_experts=enabled,
                                check_weights=str(getattr(load_format, "value", load_format)) != "dummy")
        if spec is not None:
            on_cpu = compat.is_cpu_platform()
            check_parallel_layout(on_cpu, bool(getattr(engine_args, "enable_expert_parallel", False)))
            check_quantization(on_cpu, getattr(engine_args, "quantization", None)
                               or quantization(load_config(Path(engine_args.model))))
            if enabled:
                zero_slot_mode(getattr(args, "zeda_zero_slots", "auto"), on_cpu)
    except ZedaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if spec is None:
        return  # not a ZEDA checkpoint (or a hub id): vLLM as usual
    if not enabled and getattr(args, "zeda_zero_bias", 0.0):
        logger.warning("[zeda] --zeda-zero-bias has no effect without --enable-zeda (zero experts are masked)")
    settings = {
        "enabled": enabled,
        "zero_bias": float(getattr(args, "zeda_zero_bias", 0.0)),
        "zero_slots": getattr(args, "zeda_zero_slots", "auto"),
    }
    if getattr(args, "zeda_gather_min_tokens", None) is not None:
        settings["gather_min_tokens"] = int(args.zeda_gather_min_tokens)
    extra = dict(engine_args.additional_config or {})
    extra["zeda"] = settings
    engine_args.additional_config = extra
    if not enabled:
        return
    from .cuda_graphs import extend_for_mixed_steps

    extend_for_mixed_steps(engine_args, on_cpu=compat.is_cpu_platform())
    if not engine_args.worker_extension_cls:  # vLLM's default is ""
        engine_args.worker_extension_cls = WORKER_EXTENSION
    elif not extends_stats_worker(engine_args.worker_extension_cls):
        logger.warning("[zeda] --worker-extension-cls is taken (%s): /v1/zeda/stats will be unavailable",
                       engine_args.worker_extension_cls)
    add_stats_endpoint()


def extends_stats_worker(qualname: str) -> bool:
    """Whether the worker extension `qualname` is ours or a subclass of it (so the stats RPCs exist)."""
    if qualname == WORKER_EXTENSION:
        return True
    module, _, name = qualname.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    from .stats import ZedaWorkerExtension

    return isinstance(cls, type) and issubclass(cls, ZedaWorkerExtension)


def add_stats_endpoint() -> bool:
    """Serve /v1/zeda/stats without touching VLLM_PLUGINS (an allowlist for every plugin group:
    setting it would switch off any plugin it does not name). vLLM loads endpoint plugins only
    when VLLM_PLUGINS names them, through `vllm.plugins.load_endpoint_plugins`, which its API
    server looks up when it builds the app (0.26 and 0.32); that loader is wrapped here to add
    ours where it did not load it itself. Returns whether the endpoint will be served."""
    import vllm.plugins as plugins

    original = getattr(plugins, "load_endpoint_plugins", None)
    if original is None:
        logger.warning("[zeda] this vLLM has no endpoint plugins: /v1/zeda/stats is unavailable")
        return False
    if getattr(original, "_zeda", False):
        return True

    def load_endpoint_plugins(*args, **kwargs):
        loaded = list(original(*args, **kwargs))
        if not any(getattr(p, "name", None) == ENDPOINT_PLUGIN_NAME for p in loaded):
            from .stats import ZedaStatsEndpoint

            loaded.append(ZedaStatsEndpoint())
        return loaded

    load_endpoint_plugins._zeda = True
    plugins.load_endpoint_plugins = load_endpoint_plugins
    return True
