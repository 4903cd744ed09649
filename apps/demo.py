"""The Gradio demo: chat with a bundle or a checkpoint about an image, with live speed figures.

    from tinyllava_edge.apps.demo import build_app
    from tinyllava_edge.apps.variants import discover
    app = build_app(discover("runs/tiny-shapes/bundle"), device="auto")
    app.launch(server_name="127.0.0.1", max_file_size=MAX_FILE_SIZE)

(``tinyllava-demo`` does this from the command line; see tinyllava_edge/cli/demo.py.)

Serving model: one Gradio queue with `concurrency` workers; each browser session keeps its own
conversation (a :class:`DemoSession` in ``gr.State``). Loaded models are shared: one VLM per
(variant, device), loaded on first use. A VLM holds one KV cache and is not thread-safe (see
runtime/vlm.py), so each has a lock, held for a whole answer (image encode, prefill, decode):
answers on one model run one after another, answers on different models in parallel. A session
whose turn finds the cache holding another session's conversation has it evaluated again once
(ChatSession does that): the answer is the same, only slower.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinyllava_edge.apps.uploads import file_digest, open_upload, upload_path
from tinyllava_edge.apps.variants import Variant, disk_size, model_card
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.runtime.devices import DEVICES

MAX_FILE_SIZE = "10mb"  # upload cap, enforced by Gradio's upload route
DEFAULT_CONCURRENCY = 4  # queue workers; answers on one model are serialised by its lock anyway
DEFAULT_MAX_NEW_TOKENS = 64
EXAMPLES = 6  # test-split shapes images shown under the upload
EXAMPLE_SEED = 1234
ANSWERED = "Answered"  # how the status line starts after an answer (tests and the load test look for it)
PROBLEM = "Problem:"  # ... and after a bad upload, an empty question, a model that does not load


@dataclass
class LoadedModel:
    vlm: object  # runtime.VLM
    lock: threading.Lock
    load_ms: float


class ModelPool:
    """VLMs by (variant name, device), loaded on first use; loads run one at a time."""

    def __init__(self, variants: list[Variant], load_options: dict | None = None):
        self.variants = {v.name: v for v in variants}
        self.load_options = dict(load_options or {})
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._load_lock = threading.Lock()

    def get(self, name: str, device: str) -> LoadedModel:
        from tinyllava_edge.runtime import load

        if name not in self.variants:
            raise TinyLlavaError(f"variant {name!r} is not one of {', '.join(self.variants)}")
        with self._load_lock:
            model = self._models.get((name, device))
            if model is None:
                started = time.perf_counter()
                vlm = load(self.variants[name].path, device=device, **self.load_options)
                model = LoadedModel(vlm, threading.Lock(), (time.perf_counter() - started) * 1e3)
                self._models[(name, device)] = model
            return model

    def close(self) -> None:
        with self._load_lock:
            for model in self._models.values():
                with model.lock:
                    model.vlm.close()
            self._models.clear()


@dataclass
class DemoSession:
    """One browser session: its conversation on the model it talks to."""

    key: tuple[str, str] | None = None  # (variant, device) of `chat`
    chat: object | None = None  # runtime.ChatSession
    messages: list[dict] = field(default_factory=list)  # what the Chatbot shows
    image_digest: str | None = None  # the last picture sent in this conversation


def example_images(folder: Path, n: int = EXAMPLES, seed: int = EXAMPLE_SEED) -> list[tuple[str, str]]:
    """(png path, question) for the first `n` test-split shapes images, generated now."""
    from tinyllava_edge.data.shapes import generate

    folder.mkdir(parents=True, exist_ok=True)
    examples, seen = [], set()
    for sample in generate("test", n, seed=seed):
        if sample.index in seen:
            continue
        seen.add(sample.index)
        path = folder / f"shapes_test_{sample.index:03d}.png"
        sample.image.save(path)
        examples.append((str(path), sample.question))
    return examples


def _seed(value) -> int | None:
    """The seed box: empty or negative means no seed (a fresh draw each time)."""
    if value is None or value == "":
        return None
    value = int(value)
    return None if value < 0 else value


def stats_markdown(stats, variant: Variant, device: str, load_ms: float | None = None) -> str:
    def speed(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    image = (f"{stats.image_encode_ms:.1f} ms" + (" (cached)" if stats.image_cache_hits else "")
             if stats.images else "no image this turn")
    rows = [("image encode", image), ("time to first token", f"{stats.ttft_ms:.1f} ms"),
            ("decode", f"{speed(stats.decode_tokens_per_s)} tokens/s ({stats.decode_tokens} tokens)"),
            ("prefill", f"{speed(stats.prefill_tokens_per_s)} tokens/s ({stats.prefill_tokens} positions)"),
            ("context used", f"{stats.context_used} / {stats.n_ctx}"),
            ("peak RSS", f"{stats.peak_rss_mb:.0f} MiB"),
            ("variant size on disk", f"{disk_size(variant.path) / 2**20:.1f} MiB"),
            ("device", device), ("finish", stats.finish_reason)]
    if load_ms is not None:
        rows.append(("model load", f"{load_ms:.0f} ms"))
    return "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


class DemoHandlers:
    """What the page's events call; separate from the layout so tests can call it directly."""

    def __init__(self, pool: ModelPool, allow_truncated_images: bool = False):
        self.pool = pool
        self.allow_truncated_images = allow_truncated_images  # the policy of data/images.py

    def ask(self, image, question, variant, device, max_new_tokens, temperature, top_p, seed, state):
        """Stream one answer: yields (chat messages, question box, status line, figures, state)."""
        import gradio as gr

        state = state if isinstance(state, DemoSession) else DemoSession()
        question = (question or "").strip()

        def warn(message: str):
            gr.Warning(message)
            return state.messages, question, f"{PROBLEM} {message}", gr.skip(), state

        if not question:
            yield warn("Type a question first.")
            return
        key = (variant, device)
        try:
            model = self.pool.get(variant, device)
            path = upload_path(image)
            picture = digest = None
            if path is not None:
                digest = file_digest(path)
                if digest != state.image_digest or state.key != key:  # else it is in the conversation already
                    picture = self._open(path, image)
        except (TinyLlavaError, OSError) as err:
            yield warn(" ".join(str(err).split()))
            return
        if state.key != key:  # another model: a new conversation
            state.key, state.chat, state.messages, state.image_digest = key, None, [], None
        state.messages = [*state.messages, {"role": "user", "content": ("[image] " if picture else "") + question},
                          {"role": "assistant", "content": ""}]
        answer = ""
        try:
            with model.lock:  # the VLM is not thread-safe (one KV cache)
                if state.chat is None:
                    state.chat = model.vlm.chat()
                stream = state.chat.ask_stream(picture, question, max_new_tokens=int(max_new_tokens),
                                               temperature=float(temperature), top_p=float(top_p), seed=_seed(seed))
                state.image_digest = digest if picture is not None else state.image_digest
                for piece in stream:
                    answer += piece
                    state.messages[-1] = {"role": "assistant", "content": answer}
                    yield state.messages, "", "answering…", gr.skip(), state
                stats = model.vlm.last_stats
        except TinyLlavaError as err:
            state.messages = state.messages[:-2]
            yield warn(" ".join(str(err).split()))
            return
        state.messages[-1] = {"role": "assistant", "content": answer.strip()}
        figures = stats_markdown(stats, self.pool.variants[variant], model.vlm.device, model.load_ms)
        yield state.messages, "", f"{ANSWERED} {stats.line()}", figures, state

    def check_upload(self, image):
        """On upload: say at once what is wrong with a file the model could not use."""
        import gradio as gr

        try:
            path = upload_path(image)
            if path is not None:
                self._open(path, image)
        except TinyLlavaError as err:
            message = " ".join(str(err).split())
            gr.Warning(message)
            return f"{PROBLEM} {message}"
        return "image ready: it goes with your next question"

    def _open(self, path: Path, image):
        """The uploaded file decoded, under the demo's policy for truncated images."""
        return open_upload(path, image.get("orig_name") if isinstance(image, dict) else None,
                           allow_truncated=self.allow_truncated_images)

    def switch(self, variant, device, state):
        """A new variant or device: a new conversation, and that variant's card."""
        state = DemoSession()
        return [], state, model_card(self.pool.variants[variant]), f"{variant} on {device}: new conversation"

    def clear(self):
        return [], DemoSession(), "conversation cleared"


def build_app(variants: list[Variant], device: str = "auto", *, concurrency: int = DEFAULT_CONCURRENCY,
              load_options: dict | None = None, examples_dir: Path | None = None, preload: bool = False,
              allow_truncated_images: bool = False):
    """The page (a gr.Blocks with its queue set up) for `variants`, the first selected.

    `load_options` go to `tinyllava_edge.load` (n_threads, n_ctx...). `preload` loads the first
    variant now, so a wrong bundle fails here rather than at the first question. A truncated
    upload is refused unless `allow_truncated_images` (tinyllava_edge/data/images.py). The pool
    is `app.model_pool` (close it when done) and the example images lie in `app.examples_dir`.
    The page sends Gradio no analytics and asks for no version check (see tinyllava_edge/offline.py).
    """
    import gradio as gr

    if not variants:
        raise TinyLlavaError("no variants to serve")
    if device not in DEVICES:
        raise TinyLlavaError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    pool = ModelPool(variants, load_options)
    if preload:
        pool.get(variants[0].name, device)
    handlers = DemoHandlers(pool, allow_truncated_images)
    examples_dir = Path(examples_dir or tempfile.mkdtemp(prefix="tinyllava-demo-"))
    examples = example_images(examples_dir)
    first = variants[0]

    with gr.Blocks(title="tinyllava-edge demo", analytics_enabled=False) as app:
        gr.Markdown("## tinyllava-edge: chat with a small vision-language model\nUpload an image (or pick an example), "
                    "ask about it, follow up. Figures below each answer come from the runtime.")
        state = gr.State(None)
        question = gr.Textbox(label="Question", placeholder="What shape is it?", elem_id="question", render=False)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="Image", type="filepath", format="png", sources=["upload", "clipboard"],
                                 height=260, elem_id="image")
                gr.Examples(examples=[list(e) for e in examples], inputs=[image, question],
                            label="Shapes test images (click one)", elem_id="examples", examples_per_page=EXAMPLES)
                with gr.Row():
                    variant = gr.Dropdown(choices=[(v.label, v.name) for v in variants], value=first.name,
                                          label="Variant", elem_id="variant")
                    device_box = gr.Dropdown(choices=list(DEVICES), value=device, label="Device", elem_id="device")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens",
                                        elem_id="max_new_tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p")
                    seed = gr.Number(value=-1, precision=0, label="seed (-1: none)")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=360, render_markdown=False, elem_id="chat",
                                     feedback_options=None)
                question.render()
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.Markdown("", elem_id="status")
                figures = gr.Markdown("Figures appear after the first answer.", elem_id="figures")
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown(model_card(first), elem_id="card")

        inputs = [image, question, variant, device_box, max_new, temperature, top_p, seed, state]
        outputs = [chatbot, question, status, figures, state]
        # preprocess=False: the handler gets the uploaded file as is and checks it itself, so a
        # bad upload becomes one sentence in the page rather than Gradio's generic "Error".
        send.click(handlers.ask, inputs, outputs, api_name="ask", preprocess=False)
        question.submit(handlers.ask, inputs, outputs, api_name=False, preprocess=False)
        image.upload(handlers.check_upload, image, status, api_name=False, preprocess=False)
        variant.change(handlers.switch, [variant, device_box, state], [chatbot, state, card, status], api_name=False)
        device_box.change(handlers.switch, [variant, device_box, state], [chatbot, state, card, status],
                          api_name=False)
        clear.click(handlers.clear, None, [chatbot, state, status], api_name=False)
    app.queue(default_concurrency_limit=concurrency)
    app.model_pool = pool
    app.examples_dir = examples_dir
    return app
