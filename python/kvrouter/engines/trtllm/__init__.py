"""TensorRT-LLM integration: KV cache event translation (translate)."""
