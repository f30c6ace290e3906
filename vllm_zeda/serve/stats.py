"""Per-layer skip statistics over HTTP: a worker extension and a `vllm.endpoint_plugins` plugin.

GET /v1/zeda/stats -> {"zero_fraction": x, "layers": [{"layer", "zero_slots", "total_slots"}]}
and Prometheus gauges on /metrics (`vllm_zeda_zero_fraction`, `vllm_zeda_layer_zero_fraction`).
Counters are reset once the engine is up, so warm-up and CUDA-graph capture are not counted.
"""
from __future__ import annotations

import asyncio
import logging

from . import compat

logger = logging.getLogger("vllm.zeda")  # a child of vLLM's logger: its format and level
REFRESH_SECONDS = 5.0


def _zeda_model(model):
    model = compat.unwrap_model(model)
    for m in model.modules():
        if hasattr(m, "zeda_routers"):
            return m
    return None


class ZedaWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called through collective_rpc."""

    def zeda_stats(self) -> dict | None:
        model = _zeda_model(self.model_runner.get_model())
        return None if model is None else model.zeda_stats()

    def zeda_reset_stats(self) -> bool:
        model = _zeda_model(self.model_runner.get_model())
        if model is not None:
            model.zeda_reset_stats()
        return model is not None

    def zeda_set_zero_bias(self, bias: float) -> bool:
        model = _zeda_model(self.model_runner.get_model())
        if model is not None:
            model.zeda_set_zero_bias(bias)
        return model is not None


def merge_worker_stats(results: list) -> dict | None:
    """Tensor-parallel ranks route identically: take the first rank that has a ZEDA model."""
    for r in results or []:
        if r:
            return r
    return None


class ZedaStatsEndpoint:
    name = "zeda_stats"
    required_tasks = None

    def __init__(self):
        self._engine = None
        self._gauges = None
        self._task = None

    def attach_router(self, app) -> None:
        from fastapi import APIRouter
        from fastapi.responses import JSONResponse

        router = APIRouter()

        @router.get("/v1/zeda/stats")
        async def zeda_stats():
            stats = await self.fetch()
            if stats is None:
                return JSONResponse({"error": {"message": "this server runs no ZEDA model", "type": "NotFound"}},
                                    status_code=404)
            return JSONResponse(stats)

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        self._engine = engine_client
        if engine_client is None:
            return
        await engine_client.collective_rpc("zeda_reset_stats")  # drop warm-up traffic
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def fetch(self) -> dict | None:
        if self._engine is None:
            return None
        stats = merge_worker_stats(await self._engine.collective_rpc("zeda_stats"))
        if stats is not None:
            self._export(stats)
        return stats

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.fetch()
            except Exception as exc:  # the engine is shutting down or busy: try again later
                logger.debug("zeda stats refresh failed: %s", exc)

    def _export(self, stats: dict) -> None:
        from prometheus_client import Gauge

        if self._gauges is None:
            self._gauges = (
                Gauge("vllm_zeda_zero_fraction", "fraction of routed expert slots sent to zero experts"),
                Gauge("vllm_zeda_layer_zero_fraction", "per-layer fraction of slots on zero experts", ["layer"]),
            )
        overall, per_layer = self._gauges
        overall.set(stats["zero_fraction"])
        for layer in stats["layers"]:
            t = layer["total_slots"]
            per_layer.labels(layer=str(layer["layer"])).set(layer["zero_slots"] / t if t else 0.0)
