"""tinyllava-bench speed: end to end on a miniature (one round), the roofline arithmetic, the CLI."""

import json

import pytest

from tinyllava_edge.bench.contenders import CONTENDERS
from tinyllava_edge.bench.dims import QWEN2_05B
from tinyllava_edge.bench.floors import check_floors
from tinyllava_edge.bench.roofline import checkpoint_llm_bytes_per_token, gguf_bytes_per_token, roofline_fraction
from tinyllava_edge.cli.bench import main


def test_roofline_fraction_arithmetic():
    # 60 tok/s x 400 MB per token = 24 GB/s of a 30 GB/s machine
    assert roofline_fraction(60.0, 400e6, 30e9) == pytest.approx(0.8)
    assert roofline_fraction(None, 400e6, 30e9) is None


def test_qwen2_05b_bytes_per_token(tmp_path):
    # Qwen2-0.5B: 494,032,768 parameters, of which 27,648 are q/k/v biases the count leaves out;
    # the tied 151936 x 896 table is read whole as the output matrix.
    (tmp_path / "config.json").write_text(json.dumps({"text_config": QWEN2_05B}))
    assert checkpoint_llm_bytes_per_token(tmp_path, 1.0) == 494_032_768 - 24 * (896 + 128 + 128)


def test_gguf_bytes_per_token_skips_an_untied_embedding(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    def write(name, tensors):
        writer = GGUFWriter(str(tmp_path / name), "llama")
        for key, array in tensors.items():
            writer.add_tensor(key, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    embd, out, blk = (np.zeros((8, 16), np.float32), np.zeros((8, 16), np.float32), np.zeros((4, 16), np.float32))
    tied = write("tied.gguf", {"token_embd.weight": embd, "blk.0.ffn_up.weight": blk})
    untied = write("untied.gguf", {"token_embd.weight": embd, "output.weight": out, "blk.0.ffn_up.weight": blk})
    assert gguf_bytes_per_token(tied) == embd.nbytes + blk.nbytes
    assert gguf_bytes_per_token(untied) == out.nbytes + blk.nbytes


def test_floors_compare_the_right_figures():
    rows = [{"name": "edge Q4_K_M / vision int8", "decode_tokens_per_s": 60.0, "ttft_ms": 1000.0,
             "ttft_cached_ms": 150.0},
            {"name": "torch fp32", "decode_tokens_per_s": 8.0},
            {"name": "mtmd Q4_K_M", "ttft_ms": 2000.0}]
    floors = {f["floor"]: f for f in check_floors(rows)}
    assert floors["edge Q4_K_M decode >= 6x torch fp32 eager"]["value"] == pytest.approx(7.5)
    assert floors["edge Q4_K_M decode >= 6x torch fp32 eager"]["met"] is True
    assert floors["TTFT with the image embedding cached <= 0.2x our first TTFT"]["met"] is True
    assert floors["TTFT image + question <= 0.8x stock mtmd (Q4_K_M, vision int8)"]["value"] == pytest.approx(0.5)
    assert floors["roofline fraction >= 0.6 (Q8_0)"]["met"] is None  # not run: never "met"


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["speed", "--help"])
    assert exit_.value.code == 0
    assert "bench-scale" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["missing", "file", "no-config"])
def test_bad_model_is_one_line(tmp_path, capsys, what):
    model = tmp_path / "model"
    if what == "file":
        model.write_text("x")
    elif what == "no-config":
        model.mkdir()
    assert main(["speed", "--model", str(model), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model") and "\n" not in err


def test_unknown_contender_names_the_known_ones(tmp_path, capsys):
    from tinyllava_edge.testing.checkpoints import build_miniature

    ckpt = build_miniature("TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path / "ckpt")
    assert main(["speed", "--model", str(ckpt), "--contender", "pytorch", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "'pytorch'" in err and "torch fp32" in err


def test_speed_end_to_end_on_a_miniature(tmp_path, capsys):
    from tinyllava_edge.testing.checkpoints import build_miniature

    ckpt = build_miniature("TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path / "ckpt")
    picked = ["torch fp32", "edge Q4_K_M / vision int8", "edge Q8_0 / vision fp32", "llama.cpp Q4_K_M (text)",
              "mtmd Q4_K_M"]
    args = ["speed", "--model", str(ckpt), "--rounds", "1", "--prompts", "1", "--max-new-tokens", "3",
            "--threads", "1", "--bandwidth-gib", "0.03", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "docs"), "--json", str(tmp_path / "docs" / "bench.json"), "--no-plots"]
    for name in picked:
        args += ["--contender", name]
    assert main(args) == 0
    result = json.loads((tmp_path / "docs" / "bench.json").read_text())["results"][0]
    rows = {r["name"]: r for r in result["contenders"]}
    assert set(rows) == set(picked)
    for name, row in rows.items():
        assert row["errors"] == [], (name, row["errors"])
        assert row["ttft_ms"] > 0 and row["decode_tokens"] == 3 and row["disk_bytes"] > 0 and row["peak_rss_mb"] > 0
    edge = rows["edge Q4_K_M / vision int8"]
    assert edge["image_encode_ms"] > 0 and edge["ttft_cached_ms"] > 0 and edge["bytes_per_token"] > 0
    assert edge["roofline_fraction"] == pytest.approx(
        edge["decode_tokens_per_s"] * edge["bytes_per_token"] / result["bandwidth"]["bytes_per_s"])
    assert result["bandwidth"]["bytes_per_s"] > 0 and len(result["floors"]) == 9
    table = (tmp_path / "docs" / "bench-results.md").read_text()
    assert "| edge Q4_K_M / vision int8 |" in table and "Reproduce: `tinyllava-bench speed" in table
    assert "decode tok/s" in capsys.readouterr().out


def test_every_contender_has_a_runner():
    from tinyllava_edge.bench.worker import RUNNERS

    assert {CONTENDERS.get(name).runner for name in CONTENDERS} <= set(RUNNERS)
