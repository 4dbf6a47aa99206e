"""The clients the router uses to call engines in proxy mode (Router.Generate).

* `base`: the `Backend` interface, one call (`EngineCall`), its chunks and failures;
* `grpc_engine`: the kvrouter.v1.Engine gRPC service (sim engine, TensorRT-LLM adapter);
* `openai_http`: any server speaking the OpenAI completions API over HTTP (vLLM,
  SGLang), streaming token ids back;
* `dispatch`: `Backends`, which picks a worker's backend by its registry metadata.
"""
