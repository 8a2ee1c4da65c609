"""An OpenAI-compatible server for a Megatron checkpoint (``tools/serve_judge.py``).

The pieces, each in its own module:

- :mod:`~megatron_sip.serving.config`: the flags (what is served, where, and the limits);
- :mod:`~megatron_sip.serving.protocol`: the request schemas, strict JSON parsing, error bodies;
- :mod:`~megatron_sip.serving.engine`: requests -> model work -> OpenAI answers (text, logprobs);
- :mod:`~megatron_sip.serving.worker`: the model calls, run alike on every model-parallel rank;
- :mod:`~megatron_sip.serving.scheduler`: prompts of all queued requests batched round-robin;
- :mod:`~megatron_sip.serving.app`: the FastAPI routes;
- :mod:`~megatron_sip.serving.server`: uvicorn on a thread, the model on the main thread, ranks.
"""
