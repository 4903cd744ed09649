"""What the API tests talk to.

The client suite (test_openai_suite.py) takes a base URL, so one suite checks every server an app
may move to:

* with ``TINYLLAVA_API_BASE_URL`` set (e.g. ``http://127.0.0.1:8000/v1``), it runs against that
  server; ``TINYLLAVA_API_MODEL`` names the served model (default: the first of /v1/models) and
  ``TINYLLAVA_API_KEY`` is sent when set. Tests of behaviour particular to tinyllava-serve (caps,
  file:// URLs, metrics, answers equal to the in-process runtime) skip there;
* otherwise ``tinyllava-serve`` is started here, as a command on a free loopback port, on a
  miniature bundle built in this session (Qwen2 + SigLIP miniature, F32 GGUF, random weights),
  with an API key from the environment and small caps the bad-input corpus runs into.

test_serve_pool.py runs the server in this process instead, with a slowed model, for what needs
control over timing (queue full, client disconnects, loading, worker affinity).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BASE_URL_ENV = "TINYLLAVA_API_BASE_URL"
MODEL_ENV = "TINYLLAVA_API_MODEL"
KEY_ENV = "TINYLLAVA_API_KEY"
MINIATURE = "TinyLLaVA-Qwen2-0.5B-SigLIP"
SERVED_NAME = "tiny-test"
TEST_KEY = "sk-test-0123456789"
# The started server's caps, small so the corpus reaches them with small payloads.
CAPS = {"max_body_mb": 2, "max_image_mb": 1, "max_image_pixels": 1_000_000}
STARTUP_S = 120


@dataclass(frozen=True)
class Target:
    base_url: str  # ends with /v1
    model: str
    api_key: str | None
    ours: bool  # tinyllava-serve started by this session (its caps, files folder and bundle known)
    bundle: Path | None = None
    files: Path | None = None  # the --allow-files folder

    @property
    def root(self) -> str:
        return self.base_url.rsplit("/v1", 1)[0]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@pytest.fixture(scope="session")
def miniature_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("llama_cpp")
    import torch

    from tinyllava_edge.testing.checkpoints import build_miniature_bundle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, bundle = build_miniature_bundle(MINIATURE, tmp_path_factory.mktemp("serve") / "mini")
    finally:
        torch.set_num_threads(threads)
    return bundle


@pytest.fixture(scope="session")
def target(request, tmp_path_factory) -> Target:
    base_url = os.environ.get(BASE_URL_ENV)
    if base_url:
        base_url = base_url.rstrip("/")
        key = os.environ.get(KEY_ENV) or None
        model = os.environ.get(MODEL_ENV) or _first_model(base_url, key)
        yield Target(base_url, model, key, ours=False)
        return
    pytest.importorskip("uvicorn")
    bundle = request.getfixturevalue("miniature_bundle")
    files = tmp_path_factory.mktemp("allowed")
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    args = [sys.executable, "-m", "tinyllava_edge.cli.serve", "--model", str(bundle), "--device", "cpu",
            "--port", "0", "--threads", "1", "--served-model-name", SERVED_NAME, "--allow-files", str(files)]
    for name, value in CAPS.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, KEY_ENV: TEST_KEY}  # the key through the environment, as a deployment sets it
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        base_url = _wait_ready(proc, log)
        yield Target(base_url, SERVED_NAME, TEST_KEY, ours=True, bundle=bundle, files=files)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_model(base_url: str, key: str | None) -> str:
    req = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def _wait_ready(proc: subprocess.Popen, log: Path) -> str:
    """The server's /v1 URL once GET /health answers 200 (the port is read from its first line)."""
    deadline = time.monotonic() + STARTUP_S
    base_url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tinyllava-serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if base_url is None:
            text = log.read_text()
            if " on http://" in text:
                base_url = text.split(" on http://", 1)[1].split()[0]
                base_url = "http://" + base_url
        else:
            try:
                with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return base_url
            except OSError:
                pass  # 503 while loading (HTTPError is an OSError), or not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"tinyllava-serve did not become ready in {STARTUP_S} s: {log.read_text()[-2000:]}")


@pytest.fixture
def ours(target) -> Target:
    """The target, for tests of tinyllava-serve's own behaviour (skipped against another server)."""
    if not target.ours:
        pytest.skip("checks tinyllava-serve's own behaviour; the target is another server")
    return target


@pytest.fixture(scope="session")
def client(target):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=target.base_url, api_key=target.api_key or "none", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def shapes():
    """(PIL image, question) pairs of the shapes test split: real pictures with questions about them."""
    from tinyllava_edge.data.shapes import generate

    return [(s.image, s.question) for s in generate("test", 6, seed=7)]
