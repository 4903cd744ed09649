"""transformers 4.40.1, the version TinyLLaVA_Factory pins, reads the checkpoints we write.

Runs in .venv-tf440 only (`bash scripts/test-tf440.sh`); marked `tf440`, skipped elsewhere. Our
side runs in the main environment (`.venv`, or TINYLLAVA_MAIN_PYTHON): it writes every family x
tower miniature and the default model with our outputs on fixed inputs
(tinyllava_edge/testing/interop.py). Here, transformers 4.40's own Auto classes load each
checkpoint's language-model part and tower part, split out the way the Factory reads them
(`text_config` / `vision_config` as the part's config, the weights under `language_model.` /
`vision_tower._vision_tower.`), with no missing, unexpected or mis-shaped weight. Logits must
match ours within 1e-5; hidden states within 1e-5 of their largest magnitude (the default
model's tower reaches 32, where float32 rounding alone differs by 1e-5 between the two
versions' attention code).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tinyllava_edge.testing.interop import CASES, reference_path

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.tf440

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
LLM_PREFIX = "language_model."
TOWER_PREFIX = "vision_tower._vision_tower."


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Our checkpoints and reference outputs, written by our code in the main environment."""
    python = Path(os.environ.get("TINYLLAVA_MAIN_PYTHON", ROOT / ".venv" / "bin" / "python"))
    if not python.is_file():
        pytest.fail(f"{python} does not exist: our side runs in the main environment (bash scripts/setup.sh)")
    out = tmp_path_factory.mktemp("ours")
    subprocess.run([str(python), "-m", "tinyllava_edge.testing.interop", str(out)], check=True, cwd=ROOT)
    return out


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _reference(written: Path, case: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(reference_path(written, case)))


def _part(ckpt: Path, config_key: str, prefix: str, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    """One part of a Factory checkpoint as a plain transformers directory; `drop` removes config keys."""
    from safetensors.torch import load_file, save_file

    config = json.loads((ckpt / "config.json").read_text())[config_key]
    for key in drop:
        config.pop(key)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(config))
    tensors = {k[len(prefix):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if k.startswith(prefix)}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _load(auto_class, path: Path):
    model, info = auto_class.from_pretrained(str(path), output_loading_info=True)
    return model.eval(), {k: v for k, v in info.items() if v and k != "error_msgs"}


def _llm_logits(path: Path, input_ids):
    from transformers import AutoModelForCausalLM

    model, problems = _load(AutoModelForCausalLM, path)
    with torch.no_grad():
        return model(input_ids=input_ids).logits, problems, model


def test_the_pinned_version_runs_here():
    import transformers

    assert transformers.__version__ == "4.40.1"


@pytest.mark.parametrize("case", CASES)
def test_language_model_part(written, case, tmp_path):
    ref = _reference(written, case)
    part = _part(written / case, "text_config", LLM_PREFIX, tmp_path / "llm")
    logits, problems, model = _llm_logits(part, ref["input_ids"])
    assert problems == {}, f"{case}: transformers 4.40 loading reported {problems}"
    family = case.split("-")[0] if case != "tiny-shapes" else "llama"
    assert model.config.model_type == family
    diff = (logits - ref["llm_logits"]).abs().max().item()
    assert diff <= TOL, f"{case}: LLM logits differ from ours by {diff:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_tower_part(written, case, tmp_path):
    from transformers import AutoModel

    ref = _reference(written, case)
    part = _part(written / case, "vision_config", TOWER_PREFIX, tmp_path / "tower")
    model, problems = _load(AutoModel, part)
    assert problems == {}, f"{case}: transformers 4.40 loading reported {problems}"
    with torch.no_grad():
        hidden = torch.stack(model(pixel_values=ref["pixel_values"], output_hidden_states=True).hidden_states)
    assert hidden.shape == ref["tower_hidden_states"].shape
    diff = (hidden - ref["tower_hidden_states"]).abs().max().item()
    scale = max(1.0, ref["tower_hidden_states"].abs().max().item())
    assert diff <= TOL * scale, f"{case}: tower hidden states (up to {scale:.1f}) differ from ours by {diff:.2e}"


@pytest.mark.parametrize("case, key", [("phi-siglip", "partial_rotary_factor"), ("qwen2-siglip", "rope_theta")])
def test_without_the_flat_keys_4_40_computes_something_else(written, case, key, tmp_path):
    # What the checks above guard against: 4.40 loads the file without a word, with its default.
    ref = _reference(written, case)
    part = _part(written / case, "text_config", LLM_PREFIX, tmp_path / "llm", drop=(key,))
    logits, problems, _ = _llm_logits(part, ref["input_ids"])
    assert problems == {}
    assert (logits - ref["llm_logits"]).abs().max().item() > 1e-3
