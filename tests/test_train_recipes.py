"""Recipes x stages x tune types on a miniature: which parameters train, change, or stay bit-identical.

One optimizer step (AdamW, lr 1e-2) on a random batch after `apply_tuning`. The miniature's tower
has 3 encoder layers and `vision_feature_layer = -2`, so its last layer, post-layernorm and head
never get a gradient: a trainable parameter changes exactly when it is used.
"""

import bitsandbytes as bnb
import pytest
import torch

from tinyllava_edge.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.model import TinyLlavaForConditionalGeneration
from tinyllava_edge.testing.checkpoints import miniature_config, random_model
from tinyllava_edge.train import RECIPES, STAGES, TrainConfig, TuneSpec
from tinyllava_edge.train.lora import load_merged, merge_lora, save_adapter, unload_lora
from tinyllava_edge.train.tune import TUNE_TYPES, LoraSettings, apply_tuning, resolve_vision_layer

VOCAB = 96
TOWER_LAYERS = 3
PART_PREFIX = {"language_model.": "llm", "vision_tower.": "vision_tower", "connector.": "connector"}

# Every tune type on every part it applies to, the other parts fixed so that something trains.
TUNE_CASES = [
    (part, kind) for kind in TUNE_TYPES for part in TUNE_TYPES.get(kind).parts
]
RECIPE_CASES = {  # the paper's recipes, stage by stage: (llm, vision tower, connector)
    ("base", "pretrain"): ("frozen", "frozen", "full"),
    ("base", "finetune"): ("full", "frozen", "full"),
    ("share", "pretrain"): ("full", "partial", "full"),
    ("share", "finetune"): ("full", "frozen", "full"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_registered_entry_has_a_test_case():
    assert sorted({kind for _, kind in TUNE_CASES}) == TUNE_TYPES.keys()
    assert sorted({r for r, _ in RECIPE_CASES} | {"custom"}) == RECIPES.keys()
    assert sorted({s for _, s in RECIPE_CASES}) == STAGES.keys()


def _spec_for(part: str, kind: str) -> TuneSpec:
    kinds = {"llm": "full" if part == "connector" else "frozen", "vision_tower": "frozen",
             "connector": "full" if part != "connector" else "frozen"}
    kinds[part] = kind
    return TuneSpec(kinds["llm"], kinds["vision_tower"], kinds["connector"], 1 if kinds["vision_tower"] == "partial" else None)


def _batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (2, 12), generator=g)
    ids[:, 3] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # one padded row
    size = config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "images": torch.randn(2, 3, size, size, generator=g)}


def _part(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return next(part for prefix, part in PART_PREFIX.items() if name.startswith(prefix))


def _layer(name: str) -> int | None:
    marker = "encoder.layers."
    return int(name.split(marker)[1].split(".")[0]) if marker in name else None


def _used(name: str) -> bool:
    """Whether the forward touches this parameter (feature layer -2 skips the tower's top)."""
    if _part(name) != "vision_tower":
        return True
    return _layer(name) != TOWER_LAYERS - 1 and "post_layernorm" not in name and ".head." not in name


def _expect_trainable(name: str, spec: TuneSpec) -> bool:
    kind = spec.of(_part(name))
    if "lora_" in name:
        return True
    if kind == "full":
        return True
    if kind == "partial":
        layer = _layer(name)
        return layer is not None and layer >= spec.vision_from_layer
    return False  # frozen, and the base weights under adapters


def _step(spec: TuneSpec):
    config = miniature_config("llama", "siglip", VOCAB)
    model = random_model(config)
    spec = resolve_vision_layer(spec, model)
    trained = apply_tuning(model, spec, LoraSettings(r=4, alpha=8, dropout=0.0), torch.device("cpu"))
    trained.train()
    before = {n: p.detach().clone() for n, p in trained.named_parameters()}
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    trained(**_batch(config)).loss.backward()
    opt.step()
    return model, trained, spec, before


def _check_step(trained, spec: TuneSpec, before: dict) -> None:
    changed = []
    for name, p in trained.named_parameters():
        same = torch.equal(before[name], p.detach())
        assert p.requires_grad == _expect_trainable(name, spec), name
        if not p.requires_grad:
            assert same and p.grad is None, f"frozen {name} changed or got a gradient"
        elif "lora_A" in name:
            assert (p.grad is not None) == _used(name)  # zero at step 1: lora_B starts at 0 (peft's init)
        elif _used(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
            assert not same, f"trainable {name} did not change"
            changed.append(name)
        else:
            assert same and p.grad is None, f"unused {name} changed"
    assert changed


@pytest.mark.parametrize("part,kind", TUNE_CASES, ids=[f"{p}-{k}" for p, k in TUNE_CASES])
def test_tune_type_trains_exactly_its_parameters(part, kind):
    model, trained, spec, before = _step(_spec_for(part, kind))
    _check_step(trained, spec, before)
    factory = {"partial": "partially-tune"}.get(kind, kind)
    assert getattr(model.config, {"llm": "tune_type_llm", "vision_tower": "tune_type_vision_tower",
                                  "connector": "tune_type_connector"}[part]) == factory
    if kind == "partial":
        assert model.config.tune_vision_tower_from_layer == 1
        # layer 0 of the tower is frozen and bit-identical, layer 1 trained
        assert all(torch.equal(before[n], p) for n, p in trained.named_parameters() if _layer(n) == 0)
    if kind == "qlora":
        prefix = {"llm": "language_model.", "vision_tower": "vision_tower.", "connector": "connector."}[part]
        quantized = [m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, bnb.nn.Linear4bit)]
        assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized)  # packed NF4
        assert not any(isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)
                       and "lora_" not in n and not {"head", "lm_head"} & set(n.split("."))
                       for n, m in model.named_modules() if n.startswith(prefix))


@pytest.mark.parametrize("recipe,stage", sorted(RECIPE_CASES))
def test_recipes_train_the_parts_the_paper_names(recipe, stage):
    spec = RECIPES.get(recipe).spec(stage, {"llm": None, "vision_tower": None, "connector": None}, None)
    assert (spec.llm, spec.vision_tower, spec.connector) == RECIPE_CASES[(recipe, stage)]
    _, trained, spec, before = _step(spec)
    if spec.vision_tower == "partial":
        assert spec.vision_from_layer == TOWER_LAYERS // 2  # default: half the tower
    _check_step(trained, spec, before)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_merged_lora_checkpoint_computes_what_the_lora_model_did(kind, tmp_path):
    spec = TuneSpec(kind, kind, "full")
    _, trained, _, _ = _step(spec)
    # Kept in train mode (no dropout anywhere: LoRA dropout 0): in eval mode bitsandbytes runs
    # 4-bit layers through a bf16 CPU kernel, not the fp32 path the adapters were trained on.
    config = trained.get_base_model().config
    batch = {k: v for k, v in _batch(config, seed=1).items() if k != "labels"}
    with torch.no_grad():
        reference = trained(**batch).logits
    # merged in memory, written as a plain checkpoint ...
    merged = merge_lora(trained)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    # ... or base + adapter files (the same run again: seeded), merged on load
    _, again, _, _ = _step(spec)
    save_adapter(again, tmp_path / "adapter")
    unload_lora(again).save_pretrained(tmp_path / "adapter")
    for model in (TinyLlavaForConditionalGeneration.from_pretrained(tmp_path / "merged"),
                  load_merged(tmp_path / "adapter")):
        with torch.no_grad():
            logits = model(**batch).logits
        # fp32: adding B @ A into the weight reorders the sums; 4-bit bases are dequantized exactly
        assert (logits - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("options,message", [
    (dict(recipe="custom", tune_llm="full"), "needs a tune type for every part"),
    (dict(recipe="base", tune_llm="lora"), "need --recipe custom"),
    (dict(recipe="custom", tune_llm="partial", tune_vision="full", tune_connector="full"), "vision tower only"),
    (dict(recipe="custom", tune_llm="full", tune_vision="full", tune_connector="full", tune_vision_from_layer=1),
     "'partial' vision tower only"),
    (dict(recipe="nope"), "unknown training recipe 'nope'; known: base, custom, share"),
    (dict(stage="nope"), "unknown training stage 'nope'; known: finetune, pretrain"),
    (dict(recipe="custom", tune_llm="fancy", tune_vision="full", tune_connector="full"), "unknown tune type 'fancy'"),
    (dict(preset=None, model=None), "exactly one of"),
    (dict(model=None, preset="tiny-shapes"), "needs a tokenizer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(recipe="custom", tune_llm="frozen", tune_vision="frozen", tune_connector="frozen"), "nothing to train"),
    (dict(fsdp=True, deepspeed="zero2"), "not both"),
])
def test_config_errors_are_one_clear_sentence(options, message):
    base = dict(model="ckpt", data="d.json", output="out")
    with pytest.raises(TinyLlavaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{**base, **options})


def test_partial_layer_must_exist():
    model = random_model(miniature_config("llama", "siglip", VOCAB))
    with pytest.raises(TinyLlavaError, match="has 3 encoder layers"):
        resolve_vision_layer(TuneSpec("frozen", "partial", "full", 3), model)
