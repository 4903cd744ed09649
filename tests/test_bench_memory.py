"""tinyllava-bench memory and the phi2-scale model (bench/memory.py, bench/models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

from tinyllava_edge.bench import dims  # noqa: E402
from tinyllava_edge.bench.memory import markdown_table, run_memory  # noqa: E402
from tinyllava_edge.bench.models import PHI2_SCALE, SCALES, Scale, resolve_model  # noqa: E402
from tinyllava_edge.cli.bench import main  # noqa: E402
from tinyllava_edge.model import TinyLlavaConfig, TinyLlavaForConditionalGeneration  # noqa: E402
from tinyllava_edge.model.weights import LazyWeights  # noqa: E402
from tinyllava_edge.testing.checkpoints import build_miniature  # noqa: E402


def test_phi2_scale_has_the_released_dims():
    """TinyLLaVA-Phi-2-SigLIP-3.1B: 3.22 B parameters (counted on the meta device: nothing allocated)."""
    config = TinyLlavaConfig(text_config=dict(dims.PHI2), vision_config=dict(dims.SIGLIP_SO400M),
                             connector_type="mlp2x_gelu")
    with torch.device("meta"):
        model = TinyLlavaForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    assert 3.20e9 < n < 3.24e9, n
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
            text.vocab_size, text.rope_parameters["partial_rotary_factor"]) == (2560, 32, 32, 10240, 51200, 0.4)
    assert SCALES.get(PHI2_SCALE).dtype == "bfloat16"


def test_a_bf16_scale_builds_in_bf16_and_resolves(tmp_path, monkeypatch):
    """The phi2-scale recipe at miniature dims: every tensor made and saved in bf16."""
    small_phi = dict(dims.PHI2, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=512)
    small_tower = dict(dims.SIGLIP_SO400M, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, image_size=28)
    monkeypatch.setattr(dims, "SMALL_PHI", small_phi, raising=False)
    monkeypatch.setattr(dims, "SIGLIP_SO400M", small_tower)
    scale = Scale("small-phi", "SMALL_PHI", "phi2", "microsoft/phi-2", 3072, "bfloat16")
    monkeypatch.setitem(SCALES._entries, "small-phi", scale)
    name, checkpoint, cache = resolve_model("small-phi", tmp_path)
    assert name == "small-phi" and checkpoint == tmp_path / "small-phi" / "checkpoint"
    weights = LazyWeights([checkpoint / "model.safetensors"])
    assert {weights.dtype(k) for k in weights} == {torch.bfloat16}
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.get_default_dtype() == torch.float32  # put back after the build
    model = TinyLlavaForConditionalGeneration.from_pretrained(checkpoint, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_memory_measures_every_stage_of_a_checkpoint(tmp_path):
    ckpt = build_miniature("TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path / "ckpt")
    result = run_memory(str(ckpt), tmp_path / "cache", answer_tokens=2)
    names = [s["stage"] for s in result["stages"]]
    assert names == ["export --bits 16", "export --bits 4", "quantize --bits 4", "load + one answer (4-bit bundle)"]
    size = (ckpt / "model.safetensors").stat().st_size
    assert result["checkpoint_bytes"] == size
    for s in result["stages"]:
        assert s["seconds"] > 0 and s["peak_rss_bytes"] > 50 * 2**20
        assert s["ratio_to_checkpoint"] == round(s["peak_rss_bytes"] / size, 2)
    exports = result["stages"][:2]
    assert all(e["per_stage"] and e["plan"]["peak_bytes"] > 0 for e in exports)
    assert any(r["stage"].startswith("export: ") for r in result["stages"][1]["per_stage"])
    answer = result["stages"][3]
    assert answer["answer_tokens"] == 2 and answer["rss_after_load"] > 0
    # what the floor holds the answer's memory against: the files the runtime used, its KV cache
    assert answer["files_used"][-1].startswith("llm-") and answer["files_bytes"] > 0 and answer["kv_cache_bytes"] > 0
    allowed = answer["files_bytes"] + answer["kv_cache_bytes"] + answer["prefix_store_bytes"]
    assert answer["ratio_after_answer"] == round(answer["rss_after_answer"] / allowed, 3)
    table = markdown_table(result)
    assert table.count("\n| ") == 5 and "export --bits 4" in table
    assert not any((tmp_path / "cache" / "memory" / "ckpt" / b).exists() for b in ("bundle-F16", "bundle-Q4"))


def test_memory_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["memory", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "phi2-scale" in out and "--answer-tokens" in out
