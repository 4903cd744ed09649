"""Applications on top of the runtime: the Gradio demo (``tinyllava-demo``) and the OpenAI-compatible
server (``tinyllava-serve``, the :mod:`.serve` package, docs/serve.md).

* :mod:`.variants`: which bundles / checkpoints to offer, their size on disk, their model card;
* :mod:`.uploads`: checking an uploaded image (one sentence for anything unusable; the server's too);
* :mod:`.demo`: ``build_app(variants, device) -> gr.Blocks`` and its handlers;
* :mod:`.loadtest`: concurrent sessions through gradio_client (benchmarks/demo_load.py).

Gradio is imported only inside the functions that build or serve the page.
"""
