"""Hub repository ids wherever a model is taken (tinyllava_edge/hub.py), offline.

A miniature checkpoint (two revisions), its bundle and a checkpoint with pickled weights only are
placed where `huggingface_hub.snapshot_download` puts what it fetches (`models--OWNER--NAME/`:
`blobs/`, `snapshots/<commit>/` of symlinks into them, `refs/<branch or tag>`, and for some the
tree listing `trees/<commit>.json` that huggingface_hub 2.x caches), in a cache under tmp_path.
Every command then runs on the id with HF_HUB_OFFLINE=1; one test lets huggingface_hub try the
network and refuses it at the socket (tinyllava_edge/testing/network.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tinyllava_edge
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.hub import CHECKPOINT_FILES, is_repo_id, model_name, repo_of, resolve_model
from tinyllava_edge.testing.network import NetworkGuard

MINIATURE = "TinyLLaVA-Qwen2-0.5B-SigLIP"
CKPT_ID = "tinyllava/Mini-Qwen2-SigLIP"
BUNDLE_ID = "tinyllava/Mini-Qwen2-SigLIP-bundle"
PICKLED_ID = "someone/pickled-only"
ABSENT_ID = "nobody/not-cached"
MAIN, V2, BUNDLE_COMMIT, PICKLED_COMMIT = ("1" * 40, "2" * 40, "3" * 40, "4" * 40)
CPU = {"device": "cpu", "n_threads": 1}


def place_in_cache(cache: Path, repo_id: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = (),
                   tree: dict[str, int] | None = None) -> Path:
    """Put `files` ({repository path: local file}) into `cache` as snapshot_download leaves them;
    `tree` ({repository path: size}): files of the repository listed in trees/<commit>.json beside
    those placed. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    listing = {}
    for name, source in files.items():
        data = source.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        listing[name] = {"size": len(data), "blob_id": digest[:40]}
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    if tree is not None:
        listing.update({name: {"size": size, "blob_id": "0" * 40} for name, size in tree.items()})
        (repo / "trees").mkdir(parents=True, exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The miniature's checkpoint at `main` and at tag `v2` (other weights), its bundle, and a
    checkpoint whose weights are pytorch_model.bin only, in a Hugging Face cache."""
    import torch

    from tinyllava_edge.data.shapes import write_dataset
    from tinyllava_edge.testing.checkpoints import build_miniature, build_miniature_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hub")
    ckpt, bundle = build_miniature_bundle(MINIATURE, root / "made")
    other = build_miniature(MINIATURE, root / "made" / "ckpt-v2", seed=1)
    pickled = root / "made" / "pickled"
    shutil.copytree(ckpt, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")

    cache = root / "cache"
    # the real repository also has pickles beside the safetensors: listed, never fetched
    place_in_cache(cache, CKPT_ID, MAIN, folder_files(ckpt), refs=("main",), tree={"pytorch_model.bin": 10})
    place_in_cache(cache, CKPT_ID, V2, folder_files(other), refs=("v2",))
    place_in_cache(cache, BUNDLE_ID, BUNDLE_COMMIT, folder_files(bundle), refs=("main",), tree={})
    place_in_cache(cache, PICKLED_ID, PICKLED_COMMIT, folder_files(pickled), refs=("main",))
    write_dataset(root / "data", n_train=1, n_val=1, n_test=2, image_size=32)
    image = root / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    return {"root": root, "cache": cache, "ckpt": ckpt, "ckpt_v2": other, "bundle": bundle, "data": root / "data",
            "image": image}


@pytest.fixture(autouse=True)
def offline_cache(hub, monkeypatch):
    """huggingface_hub reads its cache folder and offline flag at import: both are set here too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hub["root"] / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def snapshot(hub, repo_id: str, commit: str) -> Path:
    return hub["cache"] / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("error: ") and "\n" not in err, err
    return err


# -- resolution ----------------------------------------------------------------------------------------------------

def test_repo_ids_and_paths_are_told_apart():
    for text in ("tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B", "a/b", "Org_1/name.v2"):
        assert is_repo_id(text), text
    for text in ("runs/tiny-shapes/model", "./a/b", "/abs/path", "name", "a/b/", "a--b/c", "a/b..c", "a/b.git", "",
                 "a/" + "x" * 100):
        assert not is_repo_id(text), text


def test_revisions_pick_their_snapshot(hub):
    assert resolve_model(CKPT_ID) == snapshot(hub, CKPT_ID, MAIN)
    assert resolve_model(CKPT_ID, "main") == snapshot(hub, CKPT_ID, MAIN)
    assert resolve_model(CKPT_ID, "v2") == snapshot(hub, CKPT_ID, V2)
    assert resolve_model(CKPT_ID, V2) == snapshot(hub, CKPT_ID, V2)  # a commit hash needs no ref
    assert repo_of(snapshot(hub, CKPT_ID, V2)) == CKPT_ID and model_name(snapshot(hub, CKPT_ID, V2)) == CKPT_ID
    assert repo_of(hub["ckpt"]) is None and model_name(hub["ckpt"]) == "ckpt"

    from tinyllava_edge.model import TinyLlavaForConditionalGeneration

    def first_weight(model):
        return next(iter(model.state_dict().values()))

    pinned = TinyLlavaForConditionalGeneration.from_pretrained(CKPT_ID, revision="v2")
    local_v2 = TinyLlavaForConditionalGeneration.from_pretrained(hub["ckpt_v2"])
    local_main = TinyLlavaForConditionalGeneration.from_pretrained(hub["ckpt"])
    assert first_weight(pinned).equal(first_weight(local_v2))
    assert not first_weight(pinned).equal(first_weight(local_main))

    with pytest.raises(TinyLlavaError, match=r"no revision 'v9'|revision v9\) is not in the cache"):
        resolve_model(CKPT_ID, "v9")


def test_a_local_folder_of_the_same_name_wins(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub["ckpt_v2"], tmp_path / CKPT_ID)
    assert resolve_model(CKPT_ID) == Path(CKPT_ID)
    with pytest.raises(TinyLlavaError, match="is a local folder; a revision"):
        resolve_model(CKPT_ID, "v2")
    with tinyllava_edge.load(CKPT_ID, **CPU) as vlm:
        assert vlm.backend.path == Path(CKPT_ID) and vlm.model_id == "Mini-Qwen2-SigLIP"
    # transformers' Auto classes pass revision="main" with local folders: from_pretrained reads the folder
    from tinyllava_edge.model import TinyLlavaForConditionalGeneration

    model = TinyLlavaForConditionalGeneration.from_pretrained(CKPT_ID, revision="main")
    assert model.config._name_or_path == CKPT_ID


def test_neither_a_path_nor_an_id_is_not_found(tmp_path):
    for text in ("runs/nothing/here", "./nobody/absent", str(tmp_path / "gone")):
        assert resolve_model(text) == Path(text)
        with pytest.raises(TinyLlavaError, match="does not exist"):
            tinyllava_edge.load(text)


def test_an_uncached_id_is_one_sentence_with_the_fetch_command(hub):
    with pytest.raises(TinyLlavaError) as excinfo:
        resolve_model(ABSENT_ID, "v1")
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"{ABSENT_ID} (revision v1) is not in the cache ({hub['cache']}; HF_HUB_OFFLINE is set)" in message
    command = shlex.split(message.split("fetch it with: ", 1)[1])
    # the CLI the installed huggingface_hub ships (2.x: `hf`, with a repeated --include)
    from importlib.metadata import distribution

    scripts = {ep.name for ep in distribution("huggingface_hub").entry_points if ep.group == "console_scripts"}
    assert command[0] in scripts and command[1:5] == ["download", ABSENT_ID, "--revision", "v1"]
    included = command[6::2] if command[0] == "hf" else command[6:]
    assert set(CHECKPOINT_FILES) <= set(included) and "manifest.json" in included
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in included)


def test_a_partly_cached_bundle_names_its_files(hub, tmp_path, monkeypatch):
    """A bundle whose GGUF never arrived: the fetch command names exactly the manifest's files."""
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    files = folder_files(hub["bundle"])
    gguf = next(name for name in files if name.startswith("llm-"))
    place_in_cache(cache, BUNDLE_ID, BUNDLE_COMMIT, {k: v for k, v in files.items() if k != gguf}, refs=("main",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(TinyLlavaError, match=f"without the bundle files {gguf} .*--include {gguf}"):
        resolve_model(BUNDLE_ID)


@pytest.mark.parametrize("listed_only", [False, True], ids=["in-snapshot", "in-tree-listing"])
def test_pickled_weights_only_are_refused(hub, tmp_path, monkeypatch, capsys, listed_only):
    if listed_only:  # the pickle was never fetched (allow_patterns), but the cached listing names it
        from huggingface_hub import constants

        cache = tmp_path / "cache"
        placed = folder_files(snapshot(hub, PICKLED_ID, PICKLED_COMMIT))
        files = {k: v for k, v in placed.items() if k != "pytorch_model.bin"}
        place_in_cache(cache, PICKLED_ID, PICKLED_COMMIT, files, refs=("main",), tree={"pytorch_model.bin": 100})
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(TinyLlavaError, match=r"holds its weights only as pickles \(pytorch_model.bin\)"):
        resolve_model(PICKLED_ID)
    from tinyllava_edge.cli.export import main as export_main

    assert export_main(["--model", PICKLED_ID, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "only as pickles" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_offline_means_no_network_and_no_flag_means_the_cache_after_one_try(hub, monkeypatch):
    from huggingface_hub import constants

    with NetworkGuard() as guard:
        assert resolve_model(BUNDLE_ID) == snapshot(hub, BUNDLE_ID, BUNDLE_COMMIT)
        with pytest.raises(TinyLlavaError, match="HF_HUB_OFFLINE is set"):
            resolve_model(ABSENT_ID)
    assert guard.attempts == []

    # no offline flag: huggingface_hub asks the Hub, which cannot be reached, and the cache answers
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with NetworkGuard() as guard:
        assert resolve_model(hub["bundle"]) == hub["bundle"]  # a folder: nothing asked
        assert guard.attempts == []
        assert resolve_model(BUNDLE_ID) == snapshot(hub, BUNDLE_ID, BUNDLE_COMMIT)
        with pytest.raises(TinyLlavaError, match="the Hugging Face Hub could not be reached"):
            resolve_model(ABSENT_ID)
    assert guard.attempts and all(a.startswith("huggingface.co:") for a in guard.attempts), guard.attempts


class FakeHub:
    """snapshot_download as the Hub would answer it, without a network: each repository is
    {path: bytes} at one commit; the files the patterns select (huggingface_hub's own filter) land
    in the cache with the tree listing, as a real download leaves them. `fetched` records them."""

    def __init__(self, cache: Path, repos: dict[str, dict[str, bytes]], stage: Path):
        self.cache, self.repos, self.stage = cache, repos, stage
        self.fetched: dict[str, set[str]] = {}

    def __call__(self, repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None,
                 ignore_patterns=None, **_):
        from huggingface_hub.utils import filter_repo_objects

        assert not local_files_only and Path(cache_dir) == self.cache
        files = self.repos[repo_id]
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.fetched.setdefault(repo_id, set()).update(chosen)
        sources = {}
        for name in chosen:
            sources[name] = self.stage / repo_id / name
            sources[name].parent.mkdir(parents=True, exist_ok=True)
            sources[name].write_bytes(files[name])
        folder = self.cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit
        shutil.rmtree(folder, ignore_errors=True)
        place_in_cache(self.cache, repo_id, commit, sources, refs=(revision or "main",),
                       tree={name: len(data) for name, data in files.items()})
        return str(folder)


def test_online_only_safetensors_config_tokenizer_or_the_bundles_files_are_fetched(hub, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    checkpoint = {name: path.read_bytes() for name, path in folder_files(hub["ckpt"]).items()}
    extras = {"pytorch_model.bin": b"pickle", "training_args.bin": b"pickle", "optimizer.pt": b"pickle",
              "README.md": b"# card", "llm-F16.gguf": b"GGUF", "images/example.png": b"png"}
    bundle = {name: path.read_bytes() for name, path in folder_files(hub["bundle"]).items()}
    pickled = {name: data for name, data in checkpoint.items() if not name.endswith(".safetensors")}
    fake = FakeHub(tmp_path / "cache", {CKPT_ID: {**checkpoint, **extras},
                                        BUNDLE_ID: {**bundle, "vision-extra.onnx": b"onnx", "notes.pt": b"pickle"},
                                        PICKLED_ID: {**pickled, "pytorch_model.bin": b"pickle"}}, tmp_path / "stage")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    folder = resolve_model(CKPT_ID)
    assert fake.fetched[CKPT_ID] == set(checkpoint)  # config, weights, tokenizer files: nothing of `extras`
    assert set(folder_files(folder)) == set(checkpoint)
    folder = resolve_model(BUNDLE_ID)
    assert fake.fetched[BUNDLE_ID] == set(bundle) and set(folder_files(folder)) == set(bundle)
    with tinyllava_edge.load(BUNDLE_ID, **CPU) as vlm:
        assert vlm.model_id == BUNDLE_ID
    with pytest.raises(TinyLlavaError, match=r"only as pickles \(pytorch_model.bin\)"):
        resolve_model(PICKLED_ID)
    assert "pytorch_model.bin" not in fake.fetched[PICKLED_ID]


# -- every command on an id, offline -------------------------------------------------------------------------------

COMMANDS = ("export", "quantize", "eval", "chat", "serve", "demo")


def command_main(name: str):
    from importlib import import_module

    return import_module(f"tinyllava_edge.cli.{name}").main


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_offers_revision(name, capsys):
    with pytest.raises(SystemExit) as exc:
        command_main(name)(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--revision" in text and "Hugging Face Hub repository id" in text


@pytest.mark.parametrize("name", (*COMMANDS, "quantize-gptq"))
def test_every_command_refuses_an_uncached_id_in_one_line(name, hub, tmp_path, capsys):
    source = {"quantize": "--bundle", "quantize-gptq": "--checkpoint"}.get(name, "--model")
    out = ["--out", str(tmp_path / "out")]
    argv = {"export": out, "quantize": out, "quantize-gptq": [*out, "--torch", "gptq", "--data", str(hub["data"])],
            "eval": ["--benchmark", "shapes", "--data", str(hub["data"]), *out],
            "chat": ["--prompt", "What is it?"]}.get(name, [])
    assert command_main(name.removesuffix("-gptq"))([source, ABSENT_ID, "--revision", "v1", *argv]) == 2
    line = error_line(capsys)
    assert "is not in the cache" in line and f"hf download {ABSENT_ID} --revision v1 --include" in line
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # eval makes its (empty) output folder before loading


@pytest.mark.parametrize("name", ("serve", "demo"))
def test_a_revision_without_a_model_is_refused(name, capsys):
    assert command_main(name)(["--revision", "v2"]) == 2
    assert "no --model was given" in error_line(capsys)


def test_export_then_quantize_from_ids(hub, tmp_path, capsys):
    from tinyllava_edge.bundle import read_manifest
    from tinyllava_edge.cli.export import main as export_main
    from tinyllava_edge.cli.quantize import main as quantize_main

    out = tmp_path / "bundle"
    assert export_main(["--model", CKPT_ID, "--revision", "v2", "--out", str(out), "--bits", "32", "--no-verify",
                        "--no-mmproj", "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest["source"]["hub"] == {"repo_id": CKPT_ID, "commit": V2}
    local = read_manifest(hub["bundle"])  # exported from `main`: other weights, another source hash
    assert manifest["source"]["sha256"] != local["source"]["sha256"]

    quantized = tmp_path / "q8"
    assert quantize_main(["--bundle", BUNDLE_ID, "--out", str(quantized), "--quant", "Q8_0", "--no-verify",
                          "--quiet"]) == 0
    assert read_manifest(quantized)["quantization"]["llm"]["type"] == "Q8_0"
    assert "written" in capsys.readouterr().out


def test_eval_from_an_id(hub, tmp_path):
    from tinyllava_edge.cli.eval import main as eval_main

    out = tmp_path / "eval"
    for model in (CKPT_ID, BUNDLE_ID):
        assert eval_main(["--benchmark", "shapes", "--model", model, "--data", str(hub["data"]), "--out",
                          str(out / model.replace("/", "_")), "--limit", "2", "--batch-size", "2", "--quiet"]) == 0
        answers = (out / model.replace("/", "_") / "answers.jsonl").read_text().splitlines()
        assert len(answers) == 2 and all(json.loads(a)["model_id"] == model for a in answers)
        settings = json.loads((out / model.replace("/", "_") / "results.json").read_text())["settings"]
        assert settings["checkpoint"] == model


def test_load_and_chat_from_an_id(hub, capsys):
    from tinyllava_edge.cli.chat import main as chat_main

    image = Image.open(hub["image"]).convert("RGB")
    with tinyllava_edge.load(hub["bundle"], **CPU) as local:
        expected = local.generate(image, "What is it?", max_new_tokens=4)
    with tinyllava_edge.load(BUNDLE_ID, **CPU) as vlm:
        assert vlm.backend.kind == "edge" and vlm.model_id == BUNDLE_ID
        assert vlm.generate(image, "What is it?", max_new_tokens=4) == expected
    with tinyllava_edge.load(CKPT_ID, revision="v2", **CPU) as vlm:
        assert vlm.backend.kind == "torch" and vlm.model_id == CKPT_ID

    assert chat_main(["--model", BUNDLE_ID, "--image", str(hub["image"]), "--prompt", "What is it?", "--device", "cpu",
                      "--threads", "1", "--max-new-tokens", "4", "--no-stats"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_serve_app_from_an_id(hub):
    from starlette.testclient import TestClient

    from tinyllava_edge.apps.serve.app import build_app
    from tinyllava_edge.cli.serve import build_parser, settings_from_args

    settings = settings_from_args(build_parser().parse_args(["--model", BUNDLE_ID, "--device", "cpu", "--threads",
                                                             "1"]))
    assert settings.model == snapshot(hub, BUNDLE_ID, BUNDLE_COMMIT) and settings.served_model_name == BUNDLE_ID
    with TestClient(build_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the workers did not load"
            time.sleep(0.05)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BUNDLE_ID]
        assert client.get(f"/v1/models/{BUNDLE_ID}").json()["id"] == BUNDLE_ID
        reply = client.post("/v1/chat/completions", json={
            "model": BUNDLE_ID, "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == BUNDLE_ID


def test_demo_loads_an_id(hub):
    from tinyllava_edge.apps.demo import ModelPool
    from tinyllava_edge.apps.variants import discover

    variants = discover(BUNDLE_ID)
    assert [(v.name, v.path, v.kind) for v in variants] == [(BUNDLE_ID, snapshot(hub, BUNDLE_ID, BUNDLE_COMMIT),
                                                             "edge")]
    assert discover(CKPT_ID, revision="v2")[0].path == snapshot(hub, CKPT_ID, V2)
    pool = ModelPool(variants, {"n_threads": 1})
    try:
        loaded = pool.get(BUNDLE_ID, "cpu")
        assert loaded.vlm.model_id == BUNDLE_ID
    finally:
        pool.close()
