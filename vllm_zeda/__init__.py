"""vllm-zeda: zero-expert dynamic MoE routing for transformers and vLLM (ZEDA, arXiv 2605.18643).

Importing the package registers the ZEDA model classes with transformers' Auto* factories.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import ZedaError
from .routing import Routing, route_softmax
from .spec import ZedaSpec, read_spec


def _register_transformers() -> None:
    try:
        from .hf.modeling import register
    except ImportError:  # transformers too old/new to hold these classes: the vLLM side still works
        return
    register()


_register_transformers()

__all__ = ["Routing", "ZedaError", "ZedaSpec", "read_spec", "route_softmax", "__version__"]
