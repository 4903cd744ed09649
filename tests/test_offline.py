"""Nothing at run time reaches a network unless the user named a hub repository
(tinyllava_edge/offline.py lists the paths and how each is stopped).

The stack (imports, export, a training step, answers from a bundle and a checkpoint, 4-bit too,
the demo and the HTTP server) runs in a child process with a socket guard (tinyllava_edge/testing/network.py) and
without HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / GRADIO_ANALYTICS_ENABLED, which the rest of the
suite sets: what is checked is that the code keeps to itself, not that offline mode hides it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path

import pytest

from tinyllava_edge.testing.network import NetworkGuard, is_local

ROOT = Path(__file__).resolve().parents[1]
HIDING = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "GRADIO_ANALYTICS_ENABLED",
          "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK")

# Runs in the child. The guard goes up before anything of the stack is imported.
GUARDED = """
import json, sys
from tinyllava_edge.testing.network import NetworkGuard
guard = NetworkGuard().__enter__()
steps = []
try:
{body}
finally:
    with open(sys.argv[1], "w") as f:
        json.dump({{"attempts": guard.attempts, "steps": steps}}, f)
"""

THE_STACK = """
import socket
from pathlib import Path

import torch

torch.set_num_threads(1)
work = Path(sys.argv[2])

import bitsandbytes, peft, transformers  # noqa: F401  (bitsandbytes asked the hub when imported)
from transformers import Trainer, TrainingArguments  # noqa: F401  (imports peft and bitsandbytes)
import tinyllava_edge
from tinyllava_edge.apps.demo import build_app
from tinyllava_edge.apps.variants import discover
from tinyllava_edge.data.shapes import write_dataset
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model import load_tokenizer
from tinyllava_edge.testing.checkpoints import build_miniature_bundle
from tinyllava_edge.train import TrainConfig, train
steps.append("imported")

ckpt, bundle = build_miniature_bundle("TinyLLaVA-Qwen2-0.5B-SigLIP", work / "variants")
steps.append("exported")

write_dataset(work / "data", n_train=2, n_val=1, n_test=1, image_size=32)
train(TrainConfig(model=str(ckpt), data=str(work / "data" / "train.json"), output=str(work / "run"), max_steps=1,
                  batch_size=2, quiet=True))
steps.append("trained")

image = str(next((work / "data" / "images").iterdir()))
for path, options in ((bundle, {"n_threads": 1}), (ckpt, {}), (ckpt, {"quantization": "nf4"})):
    with tinyllava_edge.load(path, device="cpu", **options) as vlm:
        vlm.generate(image, "What shape is it?", max_new_tokens=2)
steps.append("answered")

try:  # looks like a hub repository id, but the user gave a folder
    load_tokenizer("no-such-folder/tokenizer")
except TinyLlavaError:
    steps.append("refused a missing tokenizer folder")

app = build_app(discover(work / "variants"), "cpu", load_options={"n_threads": 1}, preload=True,
                examples_dir=work / "examples")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
import urllib.request
assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).status == 200
app.close()
app.model_pool.close()
steps.append("served the demo")

import threading, time

import uvicorn

from tinyllava_edge.apps.serve.app import build_app as build_server, listening_socket
from tinyllava_edge.apps.serve.settings import ServeSettings

server_app = build_server(ServeSettings(model=bundle, served_model_name="mini", device="cpu", threads=1))
sock = listening_socket("127.0.0.1", 0)
server = uvicorn.Server(uvicorn.Config(server_app, log_level="warning"))
thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
thread.start()
url = f"http://127.0.0.1:{sock.getsockname()[1]}"
deadline = time.monotonic() + 120
while True:
    try:
        if urllib.request.urlopen(url + "/health", timeout=10).status == 200:
            break
    except OSError:  # 503 while the workers load
        pass
    assert time.monotonic() < deadline, "the server did not get ready"
    time.sleep(0.2)
request = urllib.request.Request(url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "mini", "max_tokens": 2, "messages": [
                                     {"role": "user", "content": "What shape is it?"}]}).encode())
assert urllib.request.urlopen(request, timeout=60).status == 200
server.should_exit = True
thread.join(30)
steps.append("served the API")
"""

WITHOUT_THE_HOOK = """
import tinyllava_edge, tinyllava_edge.offline
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_WithoutHubKernels"]
import bitsandbytes  # noqa: F401
steps.append("imported")
"""


def _guarded_run(tmp_path: Path, body: str, timeout: int) -> dict:
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED.format(body=textwrap.indent(textwrap.dedent(body), "    ")))
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in HIDING}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(result), str(work)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=timeout)
    assert result.is_file(), proc.stderr[-3000:]
    report = json.loads(result.read_text())
    report["returncode"], report["stderr"] = proc.returncode, proc.stderr
    return report


def test_the_guard_records_and_refuses_what_leaves_and_lets_loopback_through():
    real = socket.getaddrinfo
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
        with NetworkGuard() as guard:
            with socket.create_connection(server.getsockname(), timeout=5):
                pass
            with pytest.raises(OSError, match="network guard"):
                urllib.request.urlopen("http://example.invalid/", timeout=1)
            with pytest.raises(OSError, match="network guard"):
                socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never answered
    assert len(guard.attempts) == 2, guard.attempts
    assert guard.attempts[0].startswith("example.invalid:80 (getaddrinfo)")
    assert guard.attempts[1].startswith("192.0.2.1:80 (")
    assert socket.getaddrinfo is real  # put back
    assert is_local("127.0.0.1") and is_local("::1") and is_local("localhost") and not is_local("10.0.0.1")


def test_the_stack_reaches_no_network(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("gradio")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("uvicorn")
    report = _guarded_run(tmp_path, THE_STACK, timeout=900)
    assert report["attempts"] == [], report["attempts"]
    assert report["steps"] == ["imported", "exported", "trained", "answered", "refused a missing tokenizer folder",
                               "served the demo", "served the API"], report["stderr"][-3000:]
    assert report["returncode"] == 0, report["stderr"][-3000:]


def _asks_for_hub_kernels() -> bool:
    """bitsandbytes asks only on a CPU with AVX512-BF16, and only when `kernels` is installed."""
    import importlib.util

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags and importlib.util.find_spec("kernels") is not None


def test_without_the_import_hook_bitsandbytes_would_reach_the_hub(tmp_path):
    """The control: the guard sees what offline.py stops, so the test above can fail."""
    pytest.importorskip("bitsandbytes")
    if not _asks_for_hub_kernels():
        pytest.skip("bitsandbytes asks for hub kernels only on an AVX512-BF16 CPU with `kernels` installed")
    report = _guarded_run(tmp_path, WITHOUT_THE_HOOK, timeout=300)
    assert report["steps"] == ["imported"], report["stderr"][-3000:]
    assert any("huggingface.co" in a for a in report["attempts"]), report["attempts"]
