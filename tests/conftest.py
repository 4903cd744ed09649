import importlib.util
import os

# Tests never reach a hub: everything is built on the fly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    # GPTQModel lives in .venv-gptq only (scripts/setup-gptq.sh); find_spec does not import it (6 s)
    has_gptqmodel = importlib.util.find_spec("gptqmodel") is not None
    skip_gptq = pytest.mark.skip(reason="needs GPTQModel: bash scripts/test-gptq.sh runs these in .venv-gptq")
    # transformers 4.40 (TinyLLaVA_Factory's pin) lives in .venv-tf440 only (scripts/setup-tf440.sh)
    has_tf440 = _transformers_version().startswith("4.40.")
    skip_tf440 = pytest.mark.skip(reason="needs transformers 4.40: bash scripts/test-tf440.sh runs these in .venv-tf440")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)
        if item.get_closest_marker("gptq") is not None and not has_gptqmodel:  # not keywords: "[gptq]" ids
            item.add_marker(skip_gptq)
        if item.get_closest_marker("tf440") is not None and not has_tf440:
            item.add_marker(skip_tf440)


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return ""


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds contention on a 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def runtime_miniature(tmp_path_factory):
    """The Qwen2 miniature checkpoint and its F32 bundle, built once for the runtime's and
    tinyllava-chat's tests (they only read it; files they write go in new folders under root)."""
    import torch

    from tinyllava_edge.testing.checkpoints import build_miniature_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runtime")
    ckpt, _ = build_miniature_bundle("TinyLLaVA-Qwen2-0.5B-SigLIP", root)
    return {"root": root, "ckpt": ckpt, "bundle": root / "bundle"}
