"""The vLLM integration: the `vllm.general_plugins` entry point (`plugin`), the model classes
(`models`), the router and the hand-over to the routed experts (`router`, `handover`, `experts`,
`triton_experts`, `cpu_experts`), the router's gate (`gate`), skip statistics over HTTP
(`stats`), CUDA-graph sizes (`cuda_graphs`) and every vLLM version difference (`compat`).
Nothing here is imported by the rest of vllm_zeda."""
