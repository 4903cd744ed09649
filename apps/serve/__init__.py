"""``tinyllava-serve``: OpenAI's Chat Completions API over the runtime (docs/serve.md).

* :mod:`.settings`: what a server is started with, and the defaults;
* :mod:`.errors`: refusals in OpenAI's error shape;
* :mod:`.images`: which image URLs are taken, and the caps on them;
* :mod:`.request`: a request body -> a checked ChatRequest;
* :mod:`.pool`: workers (one runtime instance each), the bounded queue, prefix-cache affinity;
* :mod:`.responses`: completion objects and the Server-Sent Events stream;
* :mod:`.metrics`: the Prometheus metrics;
* :mod:`.app`: ``build_app(settings) -> Starlette``.

Starlette and uvicorn are imported by :mod:`.app` and the CLI only (the ``serve`` extra).
"""
