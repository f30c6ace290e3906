"""The ZEDA model classes for transformers (the reference implementation, registered with the
Auto* factories when vllm_zeda is imported)."""
