"""The bad-input corpus's shared artifacts: a Qwen2 miniature checkpoint, its F32 bundle (loaded once)
and a small shapes dataset, built once per session for the three test_bad_*.py files."""
import pytest


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    import torch  # the test files skip first where torch, onnxruntime, onnx or llama_cpp are missing

    import tinyllava_edge
    from bad_input_harness import EXACT, MINIATURE
    from tinyllava_edge.data.shapes import write_dataset
    from tinyllava_edge.testing.checkpoints import build_miniature_bundle

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_inputs")
    try:
        ckpt, _ = build_miniature_bundle(MINIATURE, root)
        write_dataset(root / "data", n_train=2, n_val=1, n_test=1, image_size=32)
    finally:
        torch.set_num_threads(before)
    with tinyllava_edge.load(root / "bundle", **EXACT) as vlm:
        yield {"root": root, "ckpt": ckpt, "bundle": root / "bundle", "data": root / "data", "vlm": vlm}


@pytest.fixture
def ctx(built, tmp_path, capsys, one_thread):
    from bad_input_harness import Ctx

    return Ctx(built, tmp_path, capsys)
