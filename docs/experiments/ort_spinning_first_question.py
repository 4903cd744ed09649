"""First-question TTFT with onnxruntime's pool threads spinning or blocking: an experiment record, not a tool.

Loads a bundle (device cpu, the runtime's own thread choice) and asks `--images` first questions
about fresh shapes images, each a new conversation, on a warm model (the system prompt cached,
as on a served worker): the median TTFT and its parts (image, prefill), and the positions
evaluated. `--spin` lets the vision graph's pool threads spin again (onnxruntime's default),
which the runtime turned off (docs/serve.md, "The follow-up floor on the default model").

    python docs/experiments/ort_spinning_first_question.py --model /tmp/serve-q4c          # blocking (the runtime's)
    python docs/experiments/ort_spinning_first_question.py --model /tmp/serve-q4c --spin   # spinning
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import onnxruntime as ort  # noqa: E402

import serve_load  # noqa: E402
import tinyllava_edge  # noqa: E402
from tinyllava_edge.apps.serve.images import ImagePolicy, load_request_image  # noqa: E402
from tinyllava_edge.runtime.edge import ORT_SPINNING  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--images", type=int, default=40)
p.add_argument("--spin", action="store_true", help="onnxruntime's default: idle pool threads spin")
a = p.parse_args()

if a.spin:
    add_entry = ort.SessionOptions.add_session_config_entry

    def spinning(self, key, value):
        add_entry(self, key, "1" if key == ORT_SPINNING else value)

    ort.SessionOptions.add_session_config_entry = spinning

questions = serve_load.shapes_questions(a.images + 10)[10:]  # not the images the load runs use
rows = []
with tinyllava_edge.load(a.model, device="cpu") as vlm:
    vlm.generate(None, "Hello.", max_new_tokens=2)  # warm-up: the system prompt is now in the KV cache
    for uri, question, _ in questions:
        image = load_request_image(uri, ImagePolicy(2**30, 2**30), "bench").decode()
        _, stats = vlm.chat(max_new_tokens=8).ask(image, question, return_stats=True)
        rows.append((stats.ttft_ms, stats.image_encode_ms, stats.prefill_ms, stats.prefill_tokens))
    spins = vlm.backend.session.get_session_options().get_session_config_entry(ORT_SPINNING)
median = [statistics.median(r[i] for r in rows) for i in range(4)]
print(f"{ORT_SPINNING}={spins}: {len(rows)} first questions, median TTFT {median[0]:.2f} ms "
      f"(image {median[1]:.2f} ms, prefill {median[2]:.2f} ms of {median[3]:.0f} positions)")
