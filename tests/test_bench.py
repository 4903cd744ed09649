"""tinyllava-bench speed: end to end on a miniature (one round), the roofline arithmetic, the CLI."""

import json

import pytest

from tinyllava_edge.bench.contenders import CONTENDERS
from tinyllava_edge.bench.dims import QWEN2_05B
from tinyllava_edge.bench.floors import check_floors
from tinyllava_edge.bench.roofline import (bandwidth_ceiling, checkpoint_llm_bytes_per_token, gguf_bytes_per_token,
                                           measure_bandwidth, roofline_fraction)
from tinyllava_edge.cli.bench import main


def test_roofline_fraction_arithmetic():
    # 60 tok/s x 400 MB per token = 24 GB/s of a 30 GB/s machine
    assert roofline_fraction(60.0, 400e6, 30e9) == pytest.approx(0.8)
    assert roofline_fraction(None, 400e6, 30e9) is None


def test_bandwidth_ceiling_keeps_fractions_at_most_one():
    # a probe that read 28.6 GB/s while F16 decode read 35 tok/s x 0.95 GB: the contender sets it
    bw, source = bandwidth_ceiling(28.6e9, [(35.0, 0.95e9), (25.0, 0.38e9), (None, 1e9), (10.0, None)])
    assert (bw, source) == (pytest.approx(33.25e9), "contender")
    assert roofline_fraction(35.0, 0.95e9, bw) == pytest.approx(1.0)
    assert bandwidth_ceiling(40e9, [(35.0, 0.95e9)]) == (40e9, "probe")


def test_measure_bandwidth_runs_both_probes():
    result = measure_bandwidth(0.01, repeats=2, threads=2)
    assert set(result["probes"]) == {"stream read", "gemv"} and result["threads"] == 2
    assert result["probe"] in result["probes"]
    assert result["bytes_per_s"] == max(p["bytes_per_s"] for p in result["probes"].values()) > 0


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
             "ttft_warm_ms": 700.0, "ttft_cached_ms": 126.0},
            {"name": "torch fp32", "decode_tokens_per_s": 8.0},
            {"name": "mtmd Q4_K_M", "ttft_ms": 2000.0}]
    floors = {f["floor"]: f for f in check_floors(rows)}
    assert floors["edge Q4_K_M decode >= 6x torch fp32 eager"]["value"] == pytest.approx(7.5)
    assert floors["edge Q4_K_M decode >= 6x torch fp32 eager"]["met"] is True
    cached = floors["TTFT with the image embedding cached <= 0.2x our first TTFT"]
    assert cached["met"] is True and cached["value"] == pytest.approx(0.18)  # against the warm TTFT
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
    # cold runs reuse nothing; warm runs reuse the system prompt (ours and raw llama.cpp), mtmd cannot
    raw = result["raw"]
    assert all(run["prefix_reused"] == 0 for run in raw["edge Q4_K_M / vision int8"][0]["runs"])
    for name in ("edge Q4_K_M / vision int8", "llama.cpp Q4_K_M (text)"):
        assert rows[name]["ttft_warm_ms"] > 0 and rows[name]["warm_reused"] > 0, name
        assert raw[name][0]["runs"][0]["prefill_tokens"] > rows[name]["warm_reused"]  # not the image rows
    assert rows["mtmd Q4_K_M"]["ttft_warm_ms"] is None
    # the same positions: raw llama.cpp gets our prompt with random ids in place of the image rows
    assert rows["llama.cpp Q4_K_M (text)"]["prefill_tokens"] == edge["prefill_tokens"]
    assert edge["roofline_fraction"] == pytest.approx(
        edge["decode_tokens_per_s"] * edge["bytes_per_token"] / result["bandwidth"]["bytes_per_s"])
    assert result["bandwidth"]["bytes_per_s"] > 0 and len(result["floors"]) == 9
    assert result["bandwidth"]["source"] in ("probe", "contender")
    assert all(r["roofline_fraction"] <= 1.0 for r in rows.values() if r["roofline_fraction"] is not None)
    table = (tmp_path / "docs" / "bench-results.md").read_text()
    assert "| edge Q4_K_M / vision int8 |" in table and "Reproduce: `tinyllava-bench speed" in table
    assert "decode tok/s" in capsys.readouterr().out


def test_every_contender_has_a_runner():
    from tinyllava_edge.bench.worker import RUNNERS

    assert {CONTENDERS.get(name).runner for name in CONTENDERS} <= set(RUNNERS)


def test_runtime_parity_script_on_a_miniature(tmp_path):
    """benchmarks/runtime_parity.py end to end (one round, a few tokens): the same positions for
    both engines, every part reported; the figures themselves are not checked (no timed tests)."""
    import subprocess
    import sys
    from pathlib import Path

    from tinyllava_edge.testing.checkpoints import build_miniature_bundle

    _, bundle = build_miniature_bundle("TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path / "mini")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime_parity.py"
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, str(script), "--bundle", str(bundle), "--cache", str(tmp_path), "--rounds",
                           "1", "--threads", "1", "--max-new-tokens", "3", "--contended-tokens", "2", "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    runs = result["parity"]["runs"]
    positions = {name: [r["prefill_positions"] for r in rs] for name, rs in runs.items()}
    assert positions["raw"] == positions["ours fixed"] == positions["ours auto"] and positions["raw"][0] > 0
    assert all(r["decode_tokens"] == 3 for rs in runs.values() for r in rs)
    contention = result["parity"]["contention"]
    # the busy process the script started is seen in /proc/stat (on a 2-core machine: 1 thread left)
    assert contention["others_busy_cores"] >= 0.5 and contention["raw"]["decode_tokens"] >= 1
    assert contention["ours auto"]["threads_chosen"] == contention["ours auto"]["threads"] >= 1
    memory = result["memory"]
    assert memory["image_positions"] == positions["raw"][0] and memory["kv_cache_bytes"] > 0
    assert memory["rss_after_answer"] >= memory["rss_after_load"] > 0
    assert set(memory["kv_cache_table"]) == {"f16", "f32", "q8_0"}
    assert "prefill ours/raw" in proc.stdout and "contended decode" in proc.stdout
