"""`vlmdeploy serve`: an OpenAI-compatible HTTP server over the runtime, with continuous batching.

    app.py          FastAPI routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics
    protocol.py     OpenAI request bodies (pydantic), responses, SSE chunks, the error shape
    prepare.py      request -> prompt embeds [S, C] (in the request's thread), through the vision cache
    engine.py       the scheduler thread: requests join and leave the running batch at step boundaries
    slots.py        the slot KV cache the scheduler decodes in
    vision_cache.py encoder outputs by image content hash, LRU with a byte budget
    metrics.py      Prometheus metrics

Needs the `serve` extra (fastapi, uvicorn, prometheus-client); `vlmdeploy.runtime` never imports it.
"""
