"""Clients the router uses to call engines in proxy mode (Router.Generate).

`openai_http`: any server speaking the OpenAI completions API over HTTP (vLLM,
SGLang), streaming token ids back.
"""
