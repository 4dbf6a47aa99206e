"""SGLang integration: KV events share vLLM's wire family (see sglang.wire)."""
