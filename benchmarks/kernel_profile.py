"""GPU kernel time per decode step inside a running vLLM engine (benchmark helper, device machine).

Worker extensions (vLLM's `worker_extension_cls`) that run torch.profiler (CUDA activity only) in
the worker process, where the model and its CUDA graphs live, and hand back the device time per
kernel name. `decode_step_kernels` profiles two batch-1 generations that differ only in their
number of decode steps and divides the difference by it, so prefill and start-up cancel out;
it also hands back how the calls of the MoE kernels spread in duration (call_spread).
Also `bench_gc_collect`, which bench_e2e calls before every timed run: a full garbage collection in
the worker's process (the engine core's, with one GPU), so that one is less likely to land inside
a run (a ~1-1.4 s stall hit single runs of every config on 2026-11-23; cause not established).
"""
from __future__ import annotations

import time

from vllm_zeda.serve.stats import ZedaWorkerExtension


class KernelProfileExtension:
    def bench_gc_collect(self) -> None:
        import gc

        gc.collect()

    def bench_profile_start(self) -> None:
        """GPU kernels where there is a GPU; on a CPU-only worker, CPU ops (the mechanics, for tests)."""
        import torch

        self._bench_on_gpu = torch.cuda.is_available()
        kind = torch.profiler.ProfilerActivity.CUDA if self._bench_on_gpu else torch.profiler.ProfilerActivity.CPU
        self._bench_prof = torch.profiler.profile(activities=[kind])
        self._bench_prof.__enter__()

    def bench_profile_stop(self) -> dict[str, list[float]]:
        """{kernel name: [launches, total device µs]} since bench_profile_start (CPU: op self µs).
        The per-call spread of the same run is kept for bench_profile_spread."""
        prof, self._bench_prof = self._bench_prof, None
        prof.__exit__(None, None, None)
        self._bench_spread = call_spread(prof, SPREAD_KERNELS, self._bench_on_gpu)
        return kernel_totals(prof, self._bench_on_gpu)

    def bench_profile_spread(self) -> dict[str, dict]:
        """call_spread of the last profiled run (bench_profile_stop)."""
        return getattr(self, "_bench_spread", {})

    def bench_timeline_start(self) -> None:
        """CPU ops and (where there is a GPU) device kernels on one clock, for run_timeline."""
        import torch

        acts = [torch.profiler.ProfilerActivity.CPU]
        acts += [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        self._bench_timeline = torch.profiler.profile(activities=acts)
        self._bench_timeline.__enter__()

    def bench_timeline_stop(self) -> dict:
        """run_timeline of everything since bench_timeline_start."""
        prof, self._bench_timeline = self._bench_timeline, None
        prof.__exit__(None, None, None)
        return run_timeline(prof)


def kernel_totals(prof, on_gpu: bool = True) -> dict[str, list[float]]:
    """{name: [launches, total µs]} of a finished torch.profiler run: self device time by kernel
    (on_gpu), else self CPU time by op; names with no time left out."""
    out = {}
    for evt in prof.key_averages():
        if on_gpu:
            us = getattr(evt, "self_device_time_total", None)
            us = evt.self_cuda_time_total if us is None else us
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            out[evt.key] = [evt.count, us]
    return out


# Kernels whose per-call durations are kept (name substrings). The fused-MoE GEMM alternates
# between a layer's two GEMMs (gate/up, then down), so its calls are also split by parity.
SPREAD_KERNELS = ("fused_moe_kernel", "_zeda_route", "topkGating", "act_and_mul", "moe_sum")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def call_spread(prof, names=SPREAD_KERNELS, on_gpu: bool = True) -> dict[str, dict]:
    """{kernel: {"calls": n, "quantiles_us": [5/25/50/75/95th percentile µs], "max_us": ...}} of
    each call of a finished torch.profiler run whose kernel name contains one of `names` (CPU: op
    names), by call duration; for a kernel launched an even number of times also its even and
    odd calls apart ("<name> [0::2]", "[1::2]"): how a kernel's calls spread, where the totals
    only give their sum."""
    from torch.autograd import DeviceType

    by_name: dict[str, list[float]] = {}
    for evt in sorted(prof.events(), key=lambda e: e.time_range.start):
        on_device = getattr(evt, "device_type", None) == DeviceType.CUDA
        if on_device == on_gpu and any(n in evt.name for n in names):
            by_name.setdefault(evt.name, []).append(evt.time_range.elapsed_us())
    out = {}
    for name, durations in by_name.items():
        parts = {name: durations}
        if len(durations) % 2 == 0:
            parts.update({f"{name} [0::2]": durations[0::2], f"{name} [1::2]": durations[1::2]})
        out.update({key: spread(d) for key, d in parts.items()})
    return out


def idle_after(intervals: list[tuple[float, float, str]]) -> dict[str, float]:
    """{name: summed idle time right after its calls} of (start, end, name) intervals on one
    device: where a sequence of kernels leaves the device idle (a graph replay's gaps), which
    per-kernel totals do not show. Overlapping intervals count as busy; a gap is charged to the
    kernel that ended last before it."""
    out: dict[str, float] = {}
    end, last = None, None
    for start, stop, name in sorted(intervals):
        if end is not None and start > end:
            out[last] = out.get(last, 0.0) + start - end
        if end is None or stop >= end:
            end, last = stop, name
    return out


def device_idle_after(prof, on_gpu: bool = True) -> dict[str, float]:
    """idle_after over the device kernels of a finished torch.profiler run (µs; CPU: ops)."""
    from torch.autograd import DeviceType

    return idle_after([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                       if (getattr(e, "device_type", None) == DeviceType.CUDA) == on_gpu])


# vLLM's model-runner scopes (gpu_model_runner.py, recorded with VLLM_CUSTOM_SCOPES_FOR_PROFILING=1):
# "gpu_model_runner: preprocess", "forward", "postprocess", "sample", "bookkeep", ...
RUNNER_SCOPE = "gpu_model_runner: "


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def gaps(intervals: list[tuple[float, float]]) -> list[float]:
    """The uncovered stretches between the first start and the last end of (start, end) intervals."""
    out, end = [], None
    for start, stop in sorted(intervals):
        if end is not None and start > end:
            out.append(start - end)
        end = stop if end is None else max(end, stop)
    return out


def timeline_summary(scopes: list[tuple[float, float, str]], kernels: list[tuple[float, float]],
                     min_gap_us: float = 50.0) -> dict:
    """Where a profiled run's wall time goes (µs), from the model runner's CPU scopes (start, end,
    name) and the device's kernels (start, end) on the same clock:
    - steps: forward scopes; wall: first to last event of either kind;
    - scopes: {name: [calls, total µs]} of the runner's scopes (nested ones counted in their own);
    - outside_runner: wall time inside the scopes' span that no scope covers (the engine core's
      scheduling and hand-offs between steps);
    - gpu_busy / gpu_idle: kernel time, overlaps once, and the rest of the kernels' span; idle gaps
      of at least min_gap_us counted and summed (short ones are launch spacing inside a step), the
      five longest listed."""
    spans = [(a, b) for a, b, _ in scopes] + list(kernels)
    if not spans:
        return {"steps": 0}
    by_scope: dict[str, list[float]] = {}
    for start, stop, name in scopes:
        entry = by_scope.setdefault(name[len(RUNNER_SCOPE):] if name.startswith(RUNNER_SCOPE) else name, [0, 0.0])
        entry[0] += 1
        entry[1] += stop - start
    runner = [(a, b) for a, b, _ in scopes]
    idle = gaps(kernels)
    long = sorted((g for g in idle if g >= min_gap_us), reverse=True)
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    return {"steps": by_scope.get("forward", [0])[0], "wall_us": round(last - first, 1),
            "scopes_us": {k: [c, round(t, 1)] for k, (c, t) in sorted(by_scope.items())},
            "outside_runner_us": round(sum(gaps(runner)), 1),
            "gpu_busy_us": round(union_length(kernels), 1), "gpu_idle_us": round(sum(idle), 1),
            "gpu_idle_gaps": {"min_us": min_gap_us, "count": len(long), "total_us": round(sum(long), 1),
                              "longest_us": [round(g, 1) for g in long[:5]]}}


def run_timeline(prof, top: int = 25) -> dict:
    """timeline_summary of a finished CPU (+ CUDA) torch.profiler run, plus its `top` CPU ops by
    self time ({name: [calls, self µs]})."""
    from torch.autograd import DeviceType

    scopes, kernels = [], []
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end))
        elif e.name.startswith(RUNNER_SCOPE):
            scopes.append((e.time_range.start, e.time_range.end, e.name))
    out = timeline_summary(scopes, kernels)
    out["cpu_ops"] = top_kernels(kernel_totals(prof, on_gpu=False), top)
    return out


def spread(durations: list[float]) -> dict:
    ordered = sorted(durations)
    at = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in QUANTILES]
    return {"calls": len(ordered), "quantiles_us": [round(x, 2) for x in at], "max_us": round(ordered[-1], 2)}


class ZedaProfileExtension(ZedaWorkerExtension, KernelProfileExtension):
    pass


def top_kernels(kernels: dict[str, list[float]], top: int) -> dict[str, list[float]]:
    """The `top` kernels of {name: [launches, µs]} by device time, largest first."""
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top])


def zero_slots(llm) -> tuple[int, int]:
    """(zero slots, slots) routed so far by a ZEDA engine's layers (rank 0's counters)."""
    layers = llm.collective_rpc("zeda_stats")[0]["layers"]
    return sum(x["zero_slots"] for x in layers), sum(x["total_slots"] for x in layers)


def _fraction(before, after) -> float | None:
    if before is None or after[1] == before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 4)


def decode_step_kernels(llm, prompt_ids: list[int], short: int = 33, long: int = 97, top: int = 40,
                        zeda: bool = False, batch: int = 1, temperature: float = 0.0) -> dict:
    """Device µs per decode step (of `batch` sequences) by kernel, from two profiled runs of
    `short` and `long` output tokens; also the summed kernel time and the wall time per step, how
    the MoE kernels' calls spread (long run) and, for a ZEDA engine, the zero fraction of these
    very steps (the counters' difference between the runs: the profiled token sequence is not the
    workload's, and at batch 1 the expert GEMMs follow its live slots)."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [(t + i) % 250 for t in prompt_ids]} for i in range(batch)]  # i=0: prompt_ids
    runs, slots = [], []
    for n in (short, long):
        sp = SamplingParams(max_tokens=n, temperature=temperature, ignore_eos=True)
        llm.generate(prompts, sp, use_tqdm=False)  # warm, unprofiled
        before = zero_slots(llm) if zeda else None
        llm.collective_rpc("bench_profile_start")
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        runs.append((wall, llm.collective_rpc("bench_profile_stop")[0]))
        if zeda:
            after = zero_slots(llm)
            slots.append((after[0] - before[0], after[1] - before[1]))
    spread_long = llm.collective_rpc("bench_profile_spread")[0]  # the long run's calls (1 prefill step among them)
    steps = long - short
    names = set(runs[0][1]) | set(runs[1][1])
    per_step = {}
    for name in names:
        c0, t0 = runs[0][1].get(name, [0, 0.0])
        c1, t1 = runs[1][1].get(name, [0, 0.0])
        per_step[name] = [round((c1 - c0) / steps, 2), round((t1 - t0) / steps, 2)]
    return {"batch": batch, "steps": steps, "wall_us_per_step": round((runs[1][0] - runs[0][0]) / steps * 1e6, 1),
            "kernel_us_per_step": round(sum(v[1] for v in per_step.values()), 1),
            "kernels": top_kernels(per_step, top), "unit": "[launches, device µs] per decode step",
            "call_spread": spread_long, "zero_fraction": _fraction(*slots) if slots else None}


def prefill_step_kernels(llm, prompts: list[list[int]], top: int = 40, zeda: bool = False) -> dict:
    """Device µs by kernel of the generate call that prefills `prompts` (together at most the
    engine's max_num_batched_tokens) with one output token each, after the same run unprofiled;
    also the wall time, how the MoE kernels' calls spread and (zeda) the call's own zero
    fraction. The scheduler may still split the prompts over two forward passes, differently per
    engine (the H200 run of 2026-11-30: two in every engine); the totals cover
    the same tokens."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch, sp, use_tqdm=False)  # warm, unprofiled (prefix caching is off in bench_e2e)
    before = zero_slots(llm) if zeda else None
    llm.collective_rpc("bench_profile_start")
    t = time.perf_counter()
    llm.generate(batch, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    kernels = llm.collective_rpc("bench_profile_stop")[0]
    after = zero_slots(llm) if zeda else None
    return {"tokens": sum(map(len, prompts)), "wall_us": round(wall * 1e6, 1),
            "kernel_us": round(sum(v[1] for v in kernels.values()), 1), "kernels": top_kernels(kernels, top),
            "unit": "[launches, device µs] in the prefill step",
            "call_spread": llm.collective_rpc("bench_profile_spread")[0], "zero_fraction": _fraction(before, after)}
