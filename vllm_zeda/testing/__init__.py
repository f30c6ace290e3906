"""Helpers for tests and examples, not for production: tiny random MoE checkpoints with a local
byte-level tokenizer (`tiny`) and a `vllm serve` process for tests (`server`)."""
