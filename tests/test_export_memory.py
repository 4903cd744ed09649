"""Export within memory: the checkpoint streamed a part at a time, the per-stage record, --max-memory,
and a full disk (export/plan.py, model/weights.py, export/bundle.py CheckpointParts).

The streaming tests fail if the export falls back to a full copy of the weights: the GGUF writer
must receive the LLM's tensors one at a time (at most one handed-out tensor alive at any moment),
the vision stage must leave every LLM weight on the meta device, and the PyTorch reference of a
bf16 checkpoint must stay bf16 while computing what a float32 copy computes.
"""

from __future__ import annotations

import errno
import gc
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from tinyllava_edge.bundle import read_manifest  # noqa: E402
from tinyllava_edge.cli.export import main as export_main  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402
from tinyllava_edge.export import export_bundle  # noqa: E402
from tinyllava_edge.export.bundle import CheckpointParts  # noqa: E402
from tinyllava_edge.export.checks import computed_in_fp32  # noqa: E402
from tinyllava_edge.export.gguf_llm import write_llm_gguf  # noqa: E402
from tinyllava_edge.memory import parse_size  # noqa: E402
from tinyllava_edge.model import TinyLlavaForConditionalGeneration  # noqa: E402
from tinyllava_edge.model.checkpoint import load_checkpoint  # noqa: E402
from tinyllava_edge.testing.checkpoints import build_miniature  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_miniature("TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path_factory.mktemp("mem") / "ckpt")


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory, ckpt):
    """The same miniature saved in bf16, as the released checkpoints are."""
    import shutil

    out = tmp_path_factory.mktemp("mem16") / "ckpt"
    shutil.copytree(ckpt, out)
    model = TinyLlavaForConditionalGeneration.from_pretrained(ckpt).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


class _Counting(dict):
    """A mapping that hands out tensors and records how many of them were alive at once."""

    def __init__(self, source):
        super().__init__()
        self.source, self.alive, self.most, self.reads = source, [], 0, 0

    def __getitem__(self, name):
        tensor = self.source[name]
        gc.collect()
        self.alive = [r for r in self.alive if r() is not None]
        self.most = max(self.most, len(self.alive) + 1)
        self.alive.append(weakref.ref(tensor))
        self.reads += 1
        return tensor


def test_llm_gguf_streams_one_tensor_at_a_time_and_equals_the_in_memory_writer(ckpt, tmp_path):
    parts = CheckpointParts(ckpt)
    vision = parts.vision()
    counting = _Counting(parts.llm_weights())
    streamed = write_llm_gguf(vision, parts.tokenizer, tmp_path / "streamed.gguf", ftype="f32", weights=counting)
    assert counting.most == 1, f"{counting.most} tensors held at once: the writer no longer streams"
    assert counting.reads == streamed["n_tensors"]
    full = TinyLlavaForConditionalGeneration.from_pretrained(ckpt)
    write_llm_gguf(full, parts.tokenizer, tmp_path / "full.gguf", ftype="f32")
    a, b = gguf.GGUFReader(tmp_path / "streamed.gguf"), gguf.GGUFReader(tmp_path / "full.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name


def test_vision_stage_loads_the_tower_and_connector_alone(ckpt):
    model = load_checkpoint(ckpt, parts=CheckpointParts.VISION)
    llm = list(model.language_model.parameters())
    assert llm and all(p.device.type == "meta" for p in llm)
    for part in CheckpointParts.VISION:
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in getattr(model, part).parameters())
    full = TinyLlavaForConditionalGeneration.from_pretrained(ckpt)
    pixels = torch.rand(1, 3, *(model.config.vision_config.image_size,) * 2)
    with torch.no_grad():
        assert torch.equal(model.encode_images(pixels), full.encode_images(pixels))


def test_bf16_reference_stays_bf16_and_computes_like_float32(bf16_ckpt):
    stored = load_checkpoint(bf16_ckpt, dtype="auto", keep_buffers=True)
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    widened = load_checkpoint(bf16_ckpt)  # float32 copy of the same bf16 values
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    pixels = torch.rand(1, 3, *(stored.config.vision_config.image_size,) * 2)
    with torch.no_grad():
        want = widened.language_model(input_ids=ids).logits
        plain = stored.language_model(input_ids=ids).logits.float()
        want_img = widened.encode_images(pixels)
        with computed_in_fp32(stored):
            got = stored.language_model(input_ids=ids).logits
            got_img = stored.encode_images(pixels)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got_img, want_img, atol=1e-5, rtol=0)
    assert (plain - want).abs().max() > 100 * (got - want).abs().max()  # bf16 compute would not pass
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}  # narrowed back after each module
    assert "encode_images" not in stored.__dict__


def test_bf16_reference_never_widens_the_embedding_or_the_output_layer_whole(bf16_ckpt):
    """The two vocabulary-sized matrices (Phi-2: 0.5 GB each in float32) stay in their stored dtype
    during the forward: the embedding widens the rows it looked up, the output layer a slice of
    its rows at a time; what comes out is still what a float32 copy computes."""
    stored = load_checkpoint(bf16_ckpt, dtype="auto", keep_buffers=True)
    widened = load_checkpoint(bf16_ckpt)
    embed, head = stored.get_input_embeddings(), stored.language_model.get_output_embeddings()
    seen, largest = [], [0]
    real_float = torch.Tensor.float

    def watch_float(tensor, *args, **kwargs):  # every widening made inside the context
        largest[0] = max(largest[0], tensor.numel())
        return real_float(tensor, *args, **kwargs)

    def record(module, args):
        seen.append((module, module.weight.dtype))

    hooks = [embed.register_forward_pre_hook(record)]
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad(), computed_in_fp32(stored):
        torch.Tensor.float = watch_float
        try:
            got = stored.language_model(input_ids=ids).logits
        finally:
            torch.Tensor.float = real_float
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        want = widened.language_model(input_ids=ids).logits
    assert seen == [(embed, torch.bfloat16)]
    layer = sum(p.numel() for p in stored.language_model.model.layers[0].parameters())
    assert largest[0] < head.weight.numel() and largest[0] <= layer  # no matrix of the vocabulary's size widened
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5, rtol=0)


def test_teacher_forced_reference_equals_greedy_decoding(bf16_ckpt):
    """One forward over the prompt and an answer gives, at every step, the logits that greedy
    decoding (prefill, then one token at a time through the KV cache) gives for that answer."""
    from tinyllava_edge.data.template import default_template_for_family, get_template
    from tinyllava_edge.export.checks import check_prompts, synthetic_images, torch_teacher_forced
    from tinyllava_edge.export.onnx_vision import preprocess_config
    from tinyllava_edge.model import load_tokenizer

    model = load_checkpoint(bf16_ckpt, dtype="auto", keep_buffers=True)
    tokenizer = load_tokenizer(bf16_ckpt)
    template = get_template(default_template_for_family(model.config.text_config.model_type))
    prompts = check_prompts(tokenizer, template, synthetic_images(2), preprocess_config(model))
    with torch.no_grad(), computed_in_fp32(model):
        decoded = [model.generate(torch.tensor([p["hf_ids"]]), images=torch.from_numpy(p["pixels"]),
                                  max_new_tokens=5, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id or 0) for p in prompts]
        runs = [{"tokens": d.sequences[0].tolist()} for d in decoded]
        forced = torch_teacher_forced(model, prompts, runs)
    for d, run, logits in zip(decoded, runs, forced):
        steps = np.stack([s[0].float().numpy() for s in d.logits])
        assert logits.shape == steps.shape == (5, steps.shape[1])
        assert np.abs(logits - steps).max() <= 1e-4 * max(1.0, np.abs(steps).max())
        assert logits.argmax(-1).tolist() == run["tokens"]


def test_bf16_checkpoint_exports_and_passes_the_checks(bf16_ckpt, tmp_path):
    result = export_bundle(bf16_ckpt, tmp_path / "b", bits=16, progress=False, check_images=1, check_tokens=4)
    v = result["manifest"]["validation"]["llm"]
    assert v["greedy_identical"] + v["greedy_ties"] == 1 and v["logits_rel_diff"] <= 2e-2
    assert "float32" in v["reference"]


def test_stages_and_plan_are_recorded(ckpt, tmp_path):
    manifest = export_bundle(ckpt, tmp_path / "b", bits=16, progress=False, check_images=1,
                             check_tokens=2)["manifest"]
    assert manifest == read_manifest(tmp_path / "b")
    stages = manifest["stages"]
    names = [s["stage"] for s in stages]
    assert any("streamed" in n for n in names) and any("PyTorch reference" in n for n in names)
    assert all(s["seconds"] >= 0 and s["peak_rss_bytes"] > 10 * 2**20 for s in stages)
    plan = manifest["memory_plan"]
    assert plan["checkpoint_bytes"] == (Path(ckpt) / "model.safetensors").stat().st_size - _header_bytes(ckpt)
    assert plan["peak_bytes"] == max(plan["stages"].values())


def _header_bytes(ckpt: Path) -> int:
    raw = (ckpt / "model.safetensors").read_bytes()[:8]
    return 8 + int.from_bytes(raw, "little")


def _one_line_error(capsys, argv) -> str:
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_max_memory_refuses_up_front_in_one_line(ckpt, tmp_path, capsys):
    out = tmp_path / "b"
    err = _one_line_error(capsys, ["--model", str(ckpt), "--out", str(out), "--bits", "4", "--max-memory", "50MB"])
    assert "this export needs about" in err and "more than --max-memory 47.7 MiB" in err, err
    assert list(tmp_path.iterdir()) == []
    err = _one_line_error(capsys, ["--model", str(ckpt), "--out", str(out), "--max-memory", "eight"])
    assert "memory size 'eight' is not understood" in err


def test_max_memory_that_fits_exports(ckpt, tmp_path):
    result = export_bundle(ckpt, tmp_path / "b", bits=16, verify=False, progress=False, max_memory=parse_size("64GB"))
    assert result["manifest"]["memory_plan"]["peak_bytes"] < 64 * 10**9


def test_too_little_free_disk_refuses_up_front(ckpt, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    err = _one_line_error(capsys, ["--model", str(ckpt), "--out", str(tmp_path / "b"), "--bits", "4", "--quiet"])
    assert "free some space or choose another --out" in err
    assert list(tmp_path.iterdir()) == []


def test_disk_filling_up_mid_export_is_one_line_and_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    """ENOSPC from the GGUF writer half-way through the tensors (a monkeypatched write; the real
    filesystem case is test_small_tmpfs_fills_up)."""
    calls = {"n": 0}
    original = gguf.GGUFWriter.write_tensor_data

    def fills_up(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fills_up)
    err = _one_line_error(capsys, ["--model", str(ckpt), "--out", str(tmp_path / "b"), "--bits", "4", "--quiet"])
    assert f"the disk filled up while writing {tmp_path / 'b'} (No space left on device)" in err, err
    assert "nothing was written there" in err
    assert list(tmp_path.iterdir()) == []


def test_small_tmpfs_fills_up(ckpt, tmp_path):
    """A real full filesystem: a tmpfs of 60 % of the bundle's size (needs permission to mount;
    skipped without it). Either the up-front check or the write itself refuses, in one line."""
    whole = export_bundle(ckpt, tmp_path / "whole", verify=False, progress=False)["path"]
    size = sum(p.stat().st_size for p in Path(whole).iterdir())
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 0.6)}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (no permission)")
    try:
        run = subprocess.run([sys.executable, "-m", "tinyllava_edge.cli.export", "--model", str(ckpt), "--out",
                              str(mount / "b"), "--no-verify", "--quiet"], capture_output=True, text=True,
                             env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        assert "free" in lines[0] or "disk filled up" in lines[0], lines[0]
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("text, want", [("8GB", 8 * 10**9), ("7.5G", 7_500_000_000), ("6GiB", 6 * 2**30),
                                        ("512MB", 512 * 10**6), ("1000", 1000)])
def test_parse_size(text, want):
    assert parse_size(text) == want


def test_parse_size_refuses_nonsense():
    with pytest.raises(TinyLlavaError, match="is not understood"):
        parse_size("8 parsecs")


def test_int4_one_weight_at_a_time_equals_onnxruntimes_quantizer(ckpt, tmp_path, monkeypatch):
    """quant/onnx_int4.py against onnxruntime's MatMulNBitsQuantizer with its default algorithm
    (the same kernel, symmetric, the same block size): the same graph outputs, from a graph whose
    weights are in vision.onnx.data."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    from tinyllava_edge.export import onnx_vision
    from tinyllava_edge.quant.onnx import INT4_BLOCK_SIZE
    from tinyllava_edge.quant.onnx_int4 import quantize_int4_streaming

    monkeypatch.setattr(onnx_vision, "_EXTERNAL_DATA_ABOVE", 0)
    model = load_checkpoint(ckpt, parts=CheckpointParts.VISION)
    graph = tmp_path / "vision.onnx"
    onnx_vision.export_vision_onnx(model, graph, validate=False)
    assert (tmp_path / "vision.onnx.data").is_file()
    ours = tmp_path / "ours.onnx"
    assert quantize_int4_streaming(graph, ours, INT4_BLOCK_SIZE) > 0
    config = mq.DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True)
    reference = mq.MatMulNBitsQuantizer(onnx.load(str(graph)), block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                        algo_config=config)
    reference.process()
    theirs = tmp_path / "theirs.onnx"
    reference.model.save_model_to_file(str(theirs), use_external_data_format=False)
    pixels = np.random.default_rng(0).random((2, 3, *(model.config.vision_config.image_size,) * 2), np.float32)

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            ["image_embeds"], {"pixel_values": pixels})[0]

    got, want, fp32 = run(ours), run(theirs), run(graph)
    assert np.allclose(got, want, atol=1e-6, rtol=0), np.abs(got - want).max()
    assert np.abs(got - fp32).max() > 1e-4  # it did quantize
    ops = {n.op_type for n in onnx.load(str(ours)).graph.node}
    assert "MatMulNBits" in ops


def test_conv_weight_int8_rounds_each_output_channel_to_its_own_scale():
    from tinyllava_edge.quant.onnx_int4 import conv_weight_int8

    weight = np.random.default_rng(0).normal(size=(6, 3, 4, 4)).astype(np.float32)
    weight[2] *= 100.0  # one loud channel must not coarsen the others
    weight[4] = 0.0
    q, scale = conv_weight_int8(weight)
    assert q.dtype == np.int8 and scale.shape == (6,) and np.abs(q).max() == 127
    back = q.astype(np.float32) * scale[:, None, None, None]
    assert np.all(np.abs(back - weight) <= scale[:, None, None, None] / 2 + 1e-7)
    assert scale[2] > 50 * scale[0] and np.all(back[4] == 0)


def test_int4_scheme_stores_the_patch_convolution_as_int8(ckpt, tmp_path):
    """The int4 scheme's graph: the patch Conv reads an int8 weight through a per-channel
    DequantizeLinear (weight-only), the graph is smaller than with a float32 Conv, and its outputs
    stay where the MatMul-only int4 graph's are."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from tinyllava_edge.export import onnx_vision
    from tinyllava_edge.quant.onnx import INT4_BLOCK_SIZE, quantize_onnx
    from tinyllava_edge.quant.onnx_int4 import quantize_int4_streaming

    model = load_checkpoint(ckpt, parts=CheckpointParts.VISION)
    graph = tmp_path / "vision.onnx"
    onnx_vision.export_vision_onnx(model, graph, validate=False)
    matmul_only = tmp_path / "matmul-only.onnx"
    quantize_int4_streaming(graph, matmul_only, INT4_BLOCK_SIZE)
    scheme = tmp_path / "vision-int4.onnx"
    quantize_onnx(graph, scheme, "int4")
    quantized = onnx.load(str(scheme))
    inits = {t.name: t for t in quantized.graph.initializer}
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    dq = next(n for n in quantized.graph.node if n.output[0] == conv.input[1])
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.INT8
    conv_weight = model.vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight
    assert list(inits[dq.input[0]].dims) == list(conv_weight.shape)
    assert list(inits[dq.input[1]].dims) == [conv_weight.shape[0]]  # one scale per output channel
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == list(conv_weight.shape)
                   for t in quantized.graph.initializer)
    saved = conv_weight.numel() * 3  # float32 -> int8, less the scales
    assert scheme.stat().st_size < matmul_only.stat().st_size - saved + 4096
    pixels = np.random.default_rng(0).random((2, 3, *(model.config.vision_config.image_size,) * 2), np.float32)

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            ["image_embeds"], {"pixel_values": pixels})[0]

    got, want = run(scheme), run(matmul_only)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.9999, cos.min()
    assert np.abs(got - want).max() > 0  # the convolution did change


def test_plan_counts_one_layer_widened_and_never_the_vocabulary_matrices():
    from tinyllava_edge.export.plan import _largest_block

    shapes = {
        "language_model.model.embed_tokens.weight": (1000, 64),
        "language_model.lm_head.weight": (1000, 64),
        "language_model.model.layers.0.mlp.up_proj.weight": (256, 64),
        "language_model.model.layers.0.mlp.down_proj.weight": (64, 256),
        "language_model.model.layers.1.mlp.up_proj.weight": (256, 64),
        "vision_tower._vision_tower.vision_model.encoder.layers.0.fc1.weight": (128, 32),
        "connector._connector.0.weight": (64, 300),
    }
    numel = {k: int(np.prod(v)) for k, v in shapes.items()}
    # layer 0 of the LLM (2 x 256 x 64) is the largest block; the 1000-row matrices are left out
    assert _largest_block(numel, shapes.get, 1000) == 4 * 2 * 256 * 64
    assert _largest_block(numel, shapes.get, 999) == 4 * 1000 * 64  # any other tensor of that size counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/maps: Linux")
def test_dropping_a_files_mapped_pages_lowers_rss_and_keeps_the_data(tmp_path):
    import mmap

    from tinyllava_edge.memory import drop_mapped_pages

    def rss_file() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile"))

    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mapped, dtype=np.uint8)
    assert int(view[::4096].sum()) >= 0  # every page touched
    before = rss_file()
    assert drop_mapped_pages(path) >= len(data)
    after = rss_file()
    assert before - after >= 48 * 2**20, (before, after)
    assert np.array_equal(view, data)  # read again from the page cache, unchanged
    del view
    mapped.close()
    assert drop_mapped_pages(tmp_path / "not-mapped.bin") == 0
