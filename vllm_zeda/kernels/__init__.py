"""GPU kernels under the vLLM layer: the Triton kernels (`ops`), the live-slot alignment
(`align`) and the fused-MoE tile tables with their JSON (`tiles`, `moe_configs/`). Nothing here
imports the rest of vllm_zeda."""
