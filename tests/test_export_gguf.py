"""LLM -> GGUF: every family loads in llama-cpp-python's llama.cpp and matches transformers.

Each case builds a tiny random checkpoint (the released models' miniatures, and the tiny-shapes
preset with our own BPE), writes F32 and F16 GGUF, and compares llama.cpp's logits on the same
token ids with the torch LLM's; tokenization and the chat template are compared too.

Measured (1 thread, these seeds, llama.cpp KV cache in F32): F32 max |logit diff| ~2e-6 for the
SiLU families (llama, qwen2, stablelm; tiny-shapes 1.9e-5 at hidden 256), 4.9e-4 for gemma and
1.6e-3 for phi: ggml's CPU GELU reads an F16 lookup table (ggml-cpu vec.h, GGML_GELU_FP16); with
that rounding emulated in torch the gap falls to ~4e-6 (phi) / 5e-5 (gemma) but for single
one-ulp flips at F16 rounding boundaries. F16 files: 1.3e-3 .. 3.8e-3 on the miniatures, 1.4e-2 on
tiny-shapes (larger logits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

from tinyllava_edge.data.template import TEMPLATES, default_template_for_family, get_template  # noqa: E402
from tinyllava_edge.errors import TinyLlavaError  # noqa: E402
from tinyllava_edge.export.chat_template import jinja_chat_template  # noqa: E402
from tinyllava_edge.export.gguf_arch import (  # noqa: E402
    GGUF_ARCHS,
    arch_for,
    hyperparameters,
    map_tensor_names,
    rope_permute,
)
from tinyllava_edge.export.gguf_llm import llm_logits_diff, write_llm_gguf  # noqa: E402
from tinyllava_edge.export.gguf_tokenizer import read_vocab  # noqa: E402
from tinyllava_edge.model import LLM_FAMILIES, load_tokenizer  # noqa: E402
from tinyllava_edge.model.checkpoint import load_checkpoint  # noqa: E402
from tinyllava_edge.testing.checkpoints import MINIATURES, build_miniature, random_model  # noqa: E402
from tinyllava_edge.testing.tokenizers import PROBE_TEXTS  # noqa: E402

F32_SILU_TOL = 1e-4  # measured <= 1.9e-5
F32_GELU_TOL = 5e-3  # measured <= 1.6e-3 (ggml's F16 GELU table)
F16_TOL = 3e-2  # measured <= 1.4e-2


@dataclass(frozen=True)
class Case:
    family: str
    ggml_model: str  # expected tokenizer.ggml.model
    ggml_pre: str  # expected tokenizer.ggml.pre
    add_bos: bool
    f32_tol: float
    miniature: str | None = None  # None: the tiny-shapes preset with the shapes tokenizer
    text_overrides: tuple[tuple[str, object], ...] = ()  # set on the miniature's text config


CASES = {
    "phi": Case("phi", "gpt2", "phi-2", False, F32_GELU_TOL, "TinyLLaVA-Phi-2-SigLIP-3.1B"),
    "qwen2": Case("qwen2", "gpt2", "qwen2", False, F32_SILU_TOL, "TinyLLaVA-Qwen2-0.5B-SigLIP"),
    "tinyllama": Case("llama", "llama", "default", True, F32_SILU_TOL, "TinyLLaVA-TinyLlama-SigLIP"),
    "stablelm": Case("stablelm", "gpt2", "stablelm2", False, F32_SILU_TOL, "TinyLLaVA-StableLM-2-SigLIP"),
    # StableLM-2-12B's layout: no post-attention norm, the MLP reads the attention's input norm.
    "stablelm-parallel": Case("stablelm", "gpt2", "stablelm2", False, F32_SILU_TOL, "TinyLLaVA-StableLM-2-SigLIP",
                              (("use_parallel_residual", True),)),
    "gemma": Case("gemma", "llama", "default", True, F32_GELU_TOL, "TinyLLaVA-Gemma-SigLIP-2.4B"),
    # Our shapes BPE puts <s> in front of every encoding (data/shapes_tokenizer.py), so add_bos.
    "tiny-shapes": Case("llama", "gpt2", "gpt-2", True, F32_SILU_TOL),
}


@dataclass
class Built:
    model: object
    tokenizer: object
    paths: dict  # ftype -> GGUF path
    reports: dict  # ftype -> write_llm_gguf report


def _checkpoint(case: Case, out: Path) -> Path:
    if case.miniature is not None:
        build_miniature(case.miniature, out)
        if case.text_overrides:
            config = load_checkpoint(out).config
            for key, value in case.text_overrides:
                setattr(config.text_config, key, value)
            random_model(config, seed=1).save_pretrained(out)
        return out
    from tinyllava_edge.data.shapes_tokenizer import train_shapes_tokenizer
    from tinyllava_edge.model.presets import get_preset

    tokenizer = load_tokenizer(train_shapes_tokenizer(out / "tokenizer"), model_type="llama", pad_token="<pad>")
    model = random_model(get_preset("tiny-shapes").config(vocab_size=len(tokenizer)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            case = CASES[name]
            root = tmp_path_factory.mktemp(name)
            ckpt = _checkpoint(case, root / "ckpt")
            model, tokenizer = load_checkpoint(ckpt), load_tokenizer(ckpt)
            reports = {ft: write_llm_gguf(model, tokenizer, root / f"llm-{ft.upper()}.gguf", ftype=ft)
                       for ft in ("f32", "f16")}
            cache[name] = Built(model, tokenizer, {ft: Path(r["path"]) for ft, r in reports.items()}, reports)
        return cache[name]

    return get


def _prompts(tokenizer, n_vocab: int) -> list[list[int]]:
    chat = get_template(default_template_for_family("llama")).render_prompt("What is in the picture?")
    return [
        list(tokenizer(chat)["input_ids"]),
        [int(i) for i in np.random.default_rng(0).integers(0, n_vocab, 24)],  # any ids, padded rows too
    ]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_every_registered_family_has_a_case():
    covered = {case.family for case in CASES.values()}
    assert set(GGUF_ARCHS) <= covered, f"no GGUF test case for {sorted(set(GGUF_ARCHS) - covered)}"
    assert set(LLM_FAMILIES) <= set(GGUF_ARCHS), f"no GGUF spec for {sorted(set(LLM_FAMILIES) - set(GGUF_ARCHS))}"
    assert {c.miniature for c in CASES.values() if c.miniature} <= set(MINIATURES)


@pytest.mark.parametrize("ftype", ["f32", "f16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_torch(name, ftype, built):
    b, case = built(name), CASES[name]
    n_vocab = b.model.config.text_config.vocab_size
    diff = llm_logits_diff(b.model, b.paths[ftype], _prompts(b.tokenizer, n_vocab))
    tol = case.f32_tol if ftype == "f32" else F16_TOL
    print(f"{name} {ftype}: max |logit diff| {diff:.2e}")
    assert diff < tol, f"{name} {ftype}: max |logit diff| {diff:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_metadata_and_tensor_types(name, built):
    import gguf

    b, case = built(name), CASES[name]
    spec = arch_for(case.family)
    reader = gguf.GGUFReader(b.paths["f16"])

    def kv(key):
        return reader.fields[key].contents()

    text = b.model.config.text_config
    assert kv("general.architecture") == spec.arch_name
    assert kv("tokenizer.ggml.model") == case.ggml_model
    assert kv("tokenizer.ggml.pre") == case.ggml_pre
    assert kv("tokenizer.ggml.add_bos_token") is case.add_bos
    assert len(kv("tokenizer.ggml.tokens")) == text.vocab_size
    assert kv("tokenizer.ggml.eos_token_id") == b.tokenizer.eos_token_id
    arch = spec.arch_name
    assert kv(f"{arch}.block_count") == text.num_hidden_layers
    assert kv(f"{arch}.attention.head_count_kv") == text.num_key_value_heads
    assert kv(f"{arch}.context_length") == text.max_position_embeddings
    names = {t.name for t in reader.tensors}
    parallel = case.family == "phi" or dict(case.text_overrides).get("use_parallel_residual", False)
    assert ("blk.0.ffn_norm.weight" in names) != parallel  # parallel blocks have one norm
    # F16 file: matrices F16, vectors (norms, biases) F32.
    for t in reader.tensors:
        expected = "F16" if len(t.shape) > 1 else "F32"
        assert t.tensor_type.name == expected, t.name
    report = b.reports["f16"]
    assert report["n_tensors"] == len(reader.tensors) and report["file_size"] == b.paths["f16"].stat().st_size
    assert (report["architecture"], report["tokenizer_pre"]) == (arch, case.ggml_pre)


# transformers' Metaspace(prepend_scheme="first") adds no "▁" to text that already starts with a
# space; sentencepiece and llama.cpp do (see tinyllava_edge/testing/tokenizers.py, tinyllama).
_LEADING_SPACE_DIFFERS = {"tinyllama"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokenization_matches_transformers(name, built):
    b = built(name)
    template = get_template(default_template_for_family(CASES[name].family))
    texts = list(PROBE_TEXTS) + [
        template.render_prompt("<image>\nWhat is in the picture?"),
        template.render([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A cat."}]),
    ]
    llm = llama_cpp.Llama(model_path=str(b.paths["f32"]), vocab_only=True, verbose=False)
    mismatched = []
    for text in texts:
        expected = list(b.tokenizer(text)["input_ids"])
        # special=True: transformers matches special added tokens inside text, llama.cpp on request.
        got = llm.tokenize(text.encode(), add_bos=True, special=True)
        if got != expected:
            mismatched.append(text)
    llm.close()
    allowed = {t for t in texts if t[:1].isspace()} if name in _LEADING_SPACE_DIFFERS else set()
    assert set(mismatched) <= allowed, mismatched


def test_legacy_sentencepiece_normalizer_tokenizes_the_same(built, tmp_path):
    """The Prepend + Replace spelling of a dummy prefix (released TinyLlama tokenizer.json)."""
    from tokenizers import normalizers

    b = built("tinyllama")
    tokenizer = load_tokenizer(Path(b.tokenizer.name_or_path))
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    assert read_vocab(tokenizer, b.model.config.text_config.vocab_size, "llama").add_space_prefix is True
    path = tmp_path / "legacy.gguf"
    write_llm_gguf(b.model, tokenizer, path, ftype="f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in PROBE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == list(tokenizer(text)["input_ids"]), text
    llm.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_chat_template_in_the_file_renders_ours(name, built):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    b = built(name)
    template = get_template(b.reports["f32"]["template"])
    llm = llama_cpp.Llama(model_path=str(b.paths["f32"]), vocab_only=True, verbose=False)
    jinja = llm.metadata["tokenizer.chat_template"]
    llm.close()
    assert jinja == jinja_chat_template(template)
    fmt = Jinja2ChatFormatter(jinja, eos_token="", bos_token="")
    got = fmt(messages=[{"role": "user", "content": "<image>\nWhat is in the picture?"}]).prompt
    assert got == template.render_prompt("<image>\nWhat is in the picture?")


_CONVERSATIONS = [
    [("user", "<image>\nWhat is it?")],
    [("user", "What is <image> it?  ")],
    [("user", "Describe.\n<image>"), ("assistant", "A red 'square'."), ("user", "And \\ the\tcolour?")],
    [("system", "ignored, as in Factory"), ("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2")],
    [("user", "No image here"), ("assistant", "ok")],
]


@pytest.mark.parametrize("template_name", list(TEMPLATES))
@pytest.mark.parametrize("turns", _CONVERSATIONS)
def test_jinja_matches_every_template(template_name, turns):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = get_template(template_name)
    role = {"user": "human", "assistant": "gpt", "system": "system"}
    ours_messages = [{"from": role[r], "value": v} for r, v in turns]
    generate = turns[-1][0] == "user"
    expected = template.render_prompt(ours_messages) if generate else template.render(ours_messages)
    fmt = Jinja2ChatFormatter(jinja_chat_template(template), eos_token="", bos_token="",
                              add_generation_prompt=generate)
    assert fmt(messages=[{"role": r, "content": v} for r, v in turns]).prompt == expected


# -- bad inputs -----------------------------------------------------------------------------------

def _no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_unknown_family_raises_and_writes_nothing(built, tmp_path):
    b = built("qwen2")
    fake = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(model_type="mistral")))
    with pytest.raises(TinyLlavaError, match="'mistral'"):
        write_llm_gguf(fake, b.tokenizer, tmp_path / "x.gguf")
    with pytest.raises(TinyLlavaError, match="'q4'"):
        write_llm_gguf(b.model, b.tokenizer, tmp_path / "x.gguf", ftype="q4")
    with pytest.raises(TinyLlavaError, match="'no-such-template'"):
        write_llm_gguf(b.model, b.tokenizer, tmp_path / "x.gguf", template="no-such-template")
    assert list(tmp_path.iterdir()) == []


def test_unknown_tokenizer_kind_raises(built, tmp_path):
    from tokenizers import pre_tokenizers

    b = built("qwen2")
    tokenizer = load_tokenizer(Path(b.tokenizer.name_or_path))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TinyLlavaError, match="unknown BPE tokenizer kind .*Whitespace"):
        write_llm_gguf(b.model, tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_no_file(built, tmp_path, monkeypatch):
    import gguf

    b = built("phi")
    out = tmp_path / "llm.gguf"
    out.write_bytes(b"previous")
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def failing(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="disk full"):
        write_llm_gguf(b.model, b.tokenizer, out)
    assert out.read_bytes() == b"previous"  # the old file is untouched, no partial one replaced it
    assert _no_leftovers(tmp_path) == []


def test_unmapped_tensors_are_reported_together():
    spec = arch_for("llama")
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias",
             "model.layers.3.mlp.experts.0.weight", "model.rotary_emb.inv_freq"]
    with pytest.raises(TinyLlavaError) as err:
        map_tensor_names(spec, names)
    message = str(err.value)
    assert message.startswith("3 llama tensors") and all(n in message for n in names[1:])


@pytest.mark.parametrize("family, setting, value", [
    ("qwen2", "use_sliding_window", True),
    ("phi", "qk_layernorm", True),
    ("stablelm", "qk_layernorm", True),
    ("llama", "hidden_act", "gelu"),
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
])
def test_unsupported_settings_raise(family, setting, value):
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, **{setting: value})
    with pytest.raises(TinyLlavaError, match=family):
        hyperparameters(arch_for(family), config)


def test_gemma_with_untied_head_raises(tmp_path):
    from tinyllava_edge.testing.checkpoints import miniature_config

    model = random_model(miniature_config("gemma", "siglip", 384))
    model.language_model.lm_head.weight = torch.nn.Parameter(model.language_model.lm_head.weight.detach().clone())
    with pytest.raises(TinyLlavaError, match="lm_head apart from its embeddings"):
        write_llm_gguf(model, None, tmp_path / "x.gguf")


def test_rope_permute_interleaves_each_head():
    rows = np.arange(2 * 6, dtype=np.float32)  # 2 heads x head_dim 6 (a bias vector)
    assert rope_permute(rows, 2).tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    w = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)
    assert np.array_equal(rope_permute(w, 2)[:, 0], rope_permute(w[:, 0], 2))


def test_writer_runs_with_progress(built, tmp_path, capsys):
    b = built("gemma")
    report = write_llm_gguf(b.model, b.tokenizer, tmp_path / "g.gguf", ftype="f16", progress=True)
    assert report["tensor_types"] == {"F16": 15, "F32": 5} and "GGUF LLM" in capsys.readouterr().err
    assert os.path.getsize(tmp_path / "g.gguf") == report["file_size"]
