"""`export_hf`: a checkpoint -> a transformers `LlavaForConditionalGeneration` folder, the layout
that serving engines read (vLLM, transformers itself), checked against PyTorch.

    export_hf("runs/tiny-shapes/model", "exports/tiny-shapes-hf")

What LLaVA expresses of a TinyLLaVA model (anything else is refused with one sentence):

* **tower**: SigLIP or CLIP (what vLLM's LLaVA builds besides Pixtral). SigLIP's pooling head is
  left out (`vision_use_head: false`): LLaVA reads hidden states, and vLLM would otherwise apply
  the head to the last layer it builds.
* **connector**: `mlp2x_gelu` only (`multi_modal_projector.linear_1`, exact GELU, `linear_2`).
* **LLM**: any family but Phi-2: transformers' LLaVA builds its own `lm_head` without a bias, and
  Phi-2's has one.
* **feature selection**: `vision_feature_layer` as is; the Factory's `patch` is LLaVA's `default`
  and `cls_patch` is `full`. Both drop / keep token 0 whatever the tower: LLaVA's `default`
  drops it for SigLIP too, which has no CLS token, exactly as the Factory's `patch` does.
* **Gemma**: TinyLLaVA scales image rows by sqrt(hidden) as the LLM's input embeddings (what
  transformers 4.x did to the whole `inputs_embeds`); LLaVA under transformers 5 and vLLM adds them
  unscaled, so the factor is folded into `linear_2` (weight and bias).

The weights carry the names of the released llava-hf checkpoints (`vision_tower.vision_model.…`,
`multi_modal_projector.linear_{1,2}.…`, `language_model.model.…`, `language_model.lm_head.…`):
vLLM 0.32 loads only those, not transformers 5's `save_pretrained` names. `<image>` becomes a real
token: the tokenizer's own if it has one, else an added one, whose id gets a zero row in the
embedding (and lm_head) when the table has no spare row. The tokenizer is saved as a plain
`tokenizers` file (`PreTrainedTokenizerFast`), so no engine rebuilds it from the LLaVA config.

The chat template renders the model's own template (`tinyllava_edge.data.template`). An engine
tokenizes the rendered text in one piece, `<image>` and the bos token being special tokens, while
the model was trained on Factory's chunk-wise ids (text split at `<image>`, each chunk tokenized
alone): for tokenizers that prefix a chunk with "▁" (SentencePiece's Metaspace), the template
emits the text that restores those ids after the bos token and after `<image>`, chosen by
measuring the tokenizer (:func:`_token_leads`).

Files: config.json, model.safetensors, the tokenizer files, preprocessor_config.json and
processor_config.json (`LlavaProcessor` with a `LlavaImageProcessor` set up as the tower's own
processor, `do_pad` for `image_aspect_ratio: pad`), chat_template.jinja, generation_config.json,
and `tinyllava-export.json`: the record of what was written and the fidelity measured
(export/hf_check.py). The folder is written beside `out_dir` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tinyllava_edge.atomic import replace_folder, staged_folder
from tinyllava_edge.bundle import FORMAT_VERSION, file_record, sha256_file
from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.staging import Steps, check_destination, source_record, tool_versions

HF_FORMAT = "hf"
RECORD_NAME = "tinyllava-export.json"
DEFAULT_CHECK_IMAGES = 3  # image prompts the fidelity check runs
DEFAULT_CHECK_TOKENS = 8  # greedy tokens generated per prompt
LOGITS_TOL = 1e-4  # max |logit difference|, fp32, transformers' LLaVA against our model
# (tower key, LLaVA's image-token count correction): LlavaProcessor adds this many tokens to the
# patch count (a CLS token), and `default` then removes one.
EXPRESSIBLE_TOWERS = {"siglip": 0, "clip": 1}
EXPRESSIBLE_CONNECTORS = ("mlp2x_gelu",)
STRATEGIES = {"patch": "default", "cls_patch": "full"}  # Factory -> LLaVA
# Our name prefix -> the released llava-hf name prefix (first match wins).
WEIGHT_NAMES = (
    ("vision_tower._vision_tower.vision_model.", "vision_tower.vision_model."),
    ("connector._connector.0.", "multi_modal_projector.linear_1."),
    ("connector._connector.2.", "multi_modal_projector.linear_2."),
    ("language_model.", "language_model."),
)
_SIGLIP_HEAD = "vision_tower._vision_tower.vision_model.head."
_TOOLS = ("tinyllava-edge", "torch", "transformers", "tokenizers", "safetensors", "numpy")


@dataclass(frozen=True)
class LlavaPlan:
    """How one checkpoint maps onto LLaVA (see the module docstring)."""

    feature_layer: int | list[int]  # LLaVA's vision_feature_layer
    strategy: str  # LLaVA's vision_feature_select_strategy
    extra_image_tokens: int  # LlavaProcessor's num_additional_image_tokens
    image_tokens: int  # rows per image
    projector_scale: float  # folded into linear_2 (Gemma's sqrt(hidden); else 1)


def plan_llava(model) -> LlavaPlan:
    """The LLaVA form of `model`, or a TinyLlavaError naming what can be exported."""
    from tinyllava_edge.model.vision import tower_for_config

    config = model.config
    tower = tower_for_config(config.vision_config).key
    what = ("HF LLaVA export takes SigLIP or CLIP towers with the mlp2x_gelu connector (what transformers' and "
            "vLLM's LLaVA can express)")
    if tower not in EXPRESSIBLE_TOWERS:
        raise TinyLlavaError(f"{what}; this checkpoint has a {tower} tower")
    if config.connector_type not in EXPRESSIBLE_CONNECTORS:
        raise TinyLlavaError(f"{what}; this checkpoint has the {config.connector_type} connector")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise TinyLlavaError(f"{what}, and an LLM whose lm_head has no bias (transformers' LLaVA builds its own "
                             f"lm_head without one); this checkpoint's {config.llm_family} LLM has a bias there")
    if getattr(model, "quantization", None):
        raise TinyLlavaError(f"HF LLaVA export needs the unquantized checkpoint; this one is {model.quantization}")
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    extra = EXPRESSIBLE_TOWERS[tower]
    strategy = STRATEGIES[config.vision_feature_select_strategy]
    tokens = patches + extra - (strategy == "default")
    layer = config.vision_feature_layer
    if layer == 0:
        # The same hidden state (the embedding output) counted from the end: transformers 5.25's LLaVA
        # passes the layer index as `output_hidden_states`, so layer 0 would ask for no hidden states.
        layer = -(vision.num_hidden_layers + 1)
    return LlavaPlan(feature_layer=layer, strategy=strategy, extra_image_tokens=extra, image_tokens=tokens,
                     projector_scale=float(model.image_features_scale))


def export_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, verify: bool = True,
              progress: bool = True, overwrite: bool = False, check_images: int = DEFAULT_CHECK_IMAGES,
              check_tokens: int = DEFAULT_CHECK_TOKENS) -> dict:
    """Export a checkpoint (any layout) as an HF LLaVA folder; returns {path, record, seconds}.

    `verify` (default) loads the folder with transformers' `LlavaForConditionalGeneration` and
    `AutoProcessor` and compares them, given raw images and text, with our model: max |logit
    difference| <= LOGITS_TOL and identical greedy tokens on `check_images` prompts of
    `check_tokens` tokens, else TinyLlavaError naming the figure. An existing non-empty `out_dir`
    is replaced only with `overwrite` and only when it holds a RECORD_NAME.
    """
    from tinyllava_edge.export.bundle import check_source, load_checkpoint_for_export

    if verify and check_images < 1:
        raise TinyLlavaError(f"check_images must be at least 1 when verifying, got {check_images}")
    source, final = Path(checkpoint_dir), Path(out_dir)
    check_destination(final, overwrite, what="HF LLaVA export", is_ours=lambda d: (d / RECORD_NAME).is_file(),
                      record_name=RECORD_NAME)
    check_source(source, gguf=False)
    steps = Steps(4 + verify, progress)
    started = time.perf_counter()
    steps.start(f"loading checkpoint {source}")
    model, tokenizer, layout = load_checkpoint_for_export(source)
    plan = plan_llava(model)
    with staged_folder(final) as staging:
        steps.start("weights -> model.safetensors (released llava-hf names)")
        image_token_id, vocab = _add_image_token(tokenizer, model)
        weights = _write_weights(model, plan, vocab, staging)
        steps.start("config, tokenizer, processor, chat template")
        written = _write_config(model, plan, image_token_id, vocab, staging)
        written += _write_processor(model, plan, tokenizer, staging)
        validation: dict[str, Any] = {"enabled": verify}
        if verify:
            from tinyllava_edge.export.hf_check import check_hf_export

            steps.start(f"checking the folder with transformers' LLaVA on {check_images} image prompts")
            validation.update(check_hf_export(model, tokenizer, staging, image_token_id, n_images=check_images,
                                              new_tokens=check_tokens, logits_tol=LOGITS_TOL))
        steps.start(f"writing {RECORD_NAME}")
        record = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "format": HF_FORMAT,
            "source": source_record(source, layout),
            "model": _model_record(model, plan, image_token_id, vocab),
            "files": [weights] + [_plain_record(staging / name) for name in sorted(set(written))],
            "validation": validation,
            "tools": tool_versions(_TOOLS),
        }
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        replace_folder(staging, final)
        steps.done()
    return {"path": str(final), "record": record, "seconds": time.perf_counter() - started}


# -- weights --------------------------------------------------------------------------------------

def _add_image_token(tokenizer, model) -> tuple[int, int]:
    """(`<image>`'s id, the LLM's vocab size after export): the tokenizer's own `<image>` token, else
    one added; the vocab grows only when that id has no row in the embedding table."""
    vocab = int(model.config.text_config.vocab_size)
    ids = tokenizer.encode(DEFAULT_IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
        ids = tokenizer.encode(DEFAULT_IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise TinyLlavaError(f"the tokenizer does not take {DEFAULT_IMAGE_TOKEN} as one token even after adding it")
    return ids[0], max(vocab, ids[0] + 1)


def llava_state_dict(model, plan: LlavaPlan, vocab: int) -> dict:
    """Our weights under the released llava-hf names (tied lm_head and SigLIP's head left out), the
    embedding tables grown to `vocab` rows with zeros, Gemma's image-row scale folded into linear_2."""
    import torch

    tied = model.tied_embeddings
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(_SIGLIP_HEAD) or (tied and name == "language_model.lm_head.weight"):
            continue
        if name.endswith("position_ids"):  # a buffer, not a weight
            continue
        src, dst = next((s, d) for s, d in WEIGHT_NAMES if name.startswith(s))
        out[dst + name[len(src):]] = tensor.detach().to(torch.float32).contiguous().clone()
    if plan.projector_scale != 1.0:
        for part in ("weight", "bias"):
            out[f"multi_modal_projector.linear_2.{part}"] *= plan.projector_scale
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                 "language_model.lm_head.bias"):
        if name in out and out[name].shape[0] < vocab:
            grown = out[name].new_zeros((vocab - out[name].shape[0], *out[name].shape[1:]))
            out[name] = torch.cat([out[name], grown])
    return out


def _write_weights(model, plan: LlavaPlan, vocab: int, folder: Path) -> dict:
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    save_file(llava_state_dict(model, plan, vocab), str(path), metadata={"format": "pt"})
    return file_record(path, "weights", "safetensors", "F32")


# -- config, tokenizer, processor ----------------------------------------------------------------

def llava_config(model, plan: LlavaPlan, image_token_id: int, vocab: int) -> dict:
    """config.json of the LLaVA folder, plus two Factory keys our reader takes back."""
    from transformers import LlavaConfig

    config = model.config
    text = config.text_config.to_dict()
    text.update(vocab_size=vocab, architectures=[type(model.language_model).__name__])
    vision = config.vision_config.to_dict()
    if vision.get("model_type") == "siglip_vision_model":
        vision["vision_use_head"] = False
    llava = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token_id,
        image_seq_length=plan.image_tokens,
        projector_hidden_act="gelu",  # transformers' exact GELU, the Factory's nn.GELU()
        multimodal_projector_bias=True,
        vision_feature_layer=plan.feature_layer,
        vision_feature_select_strategy=plan.strategy,
        tie_word_embeddings=bool(model.tied_embeddings),
        pad_token_id=config.pad_token_id,
    )
    raw = llava.to_dict()
    raw["architectures"] = ["LlavaForConditionalGeneration"]
    raw["dtype"] = "float32"  # what model.safetensors holds
    # Not LLaVA's: how our runtime reads the folder back (engines ignore unknown keys).
    raw["image_aspect_ratio"] = config.image_aspect_ratio
    raw["tokenizer_model_max_length"] = config.tokenizer_model_max_length
    return raw


def _write_config(model, plan: LlavaPlan, image_token_id: int, vocab: int, folder: Path) -> list[str]:
    from transformers import GenerationConfig

    (folder / "config.json").write_text(json.dumps(llava_config(model, plan, image_token_id, vocab), indent=2)
                                        + "\n", encoding="utf-8")
    text = model.config.text_config
    generation = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                  pad_token_id=model.config.pad_token_id)
    generation.save_pretrained(folder)
    return ["config.json", "generation_config.json"]


def _token_leads(tokenizer, template) -> tuple[str, str]:
    """(text before the prompt, text after `<image>`) that make the one-piece tokenization of a
    rendered prompt equal Factory's chunk-wise ids: the bos token (when the tokenizer adds one) and
    what must follow it and `<image>`. Raises when no candidate does."""
    from tinyllava_edge.data.template import tokenizer_image_token

    prompt = template.render_prompt(DEFAULT_IMAGE_TOKEN + "\nWhat colour is the square?")
    want = tokenizer_image_token(prompt, tokenizer)
    adds_bos = tokenizer.bos_token_id is not None and want[:1] == [tokenizer.bos_token_id]
    image_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    head, tail = prompt.split(DEFAULT_IMAGE_TOKEN, 1)
    # SentencePiece's Metaspace puts "▁" before the first piece of a text tokenized alone, not
    # before text that follows a special token: a space there gives the same piece.
    for before in (tokenizer.bos_token, tokenizer.bos_token + " ") if adds_bos else ("",):
        for after_image in ("", " "):
            got = tokenizer(before + head + DEFAULT_IMAGE_TOKEN + after_image + tail,
                            add_special_tokens=False)["input_ids"]
            if [IMAGE_TOKEN_INDEX if i == image_id else i for i in got] == want:
                return before, after_image
    raise TinyLlavaError("the tokenizer gives other ids for the rendered prompt in one piece than Factory's "
                         "chunk-wise tokenization, whatever text follows the bos token and <image>; it cannot be "
                         "served as an HF LLaVA folder")


def hf_chat_template(tokenizer, template) -> str:
    """The model's own template as Jinja for transformers / vLLM (OpenAI messages, bos, token leads)."""
    from tinyllava_edge.export.chat_template import jinja_chat_template

    before, after_image = _token_leads(tokenizer, template)
    return jinja_chat_template(template, openai_messages=True, bos=before, after_image=after_image)


def image_processor_settings(model) -> dict:
    """`LlavaImageProcessor` settings that reproduce our preprocessing (tinyllava_edge.data.preprocess)."""
    from tinyllava_edge.export.onnx_vision import preprocess_config

    pre = preprocess_config(model)
    height, width = pre.size
    crop = {"height": height, "width": width}
    if pre.resize_mode == "resize":
        size, center_crop = dict(crop), False
    else:
        size, center_crop = {"shortest_edge": pre.shortest_edge}, True
    return {"do_resize": True, "size": size, "resample": pre.resample, "do_center_crop": center_crop,
            "crop_size": crop, "do_rescale": True, "rescale_factor": pre.rescale_factor, "do_normalize": True,
            "image_mean": list(pre.image_mean), "image_std": list(pre.image_std), "do_pad": pre.aspect == "pad",
            "do_convert_rgb": True}


def _write_processor(model, plan: LlavaPlan, tokenizer, folder: Path) -> list[str]:
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from tinyllava_edge.data.template import default_template_for_family, get_template

    template = get_template(default_template_for_family(model.config.llm_family))
    chat_template = hf_chat_template(tokenizer, template)
    tokenizer.chat_template = chat_template
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**image_processor_settings(model)),
        tokenizer=tokenizer,
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=plan.strategy,
        num_additional_image_tokens=plan.extra_image_tokens,
        chat_template=chat_template,
        image_token=DEFAULT_IMAGE_TOKEN,
    )
    before = set(os.listdir(folder))
    processor.save_pretrained(folder)
    # transformers 5.25 nests the image processor in processor_config.json; its own file too, for
    # readers that look only there (vLLM 0.32 runs transformers 5.19)
    processor.image_processor.save_pretrained(folder)
    _plain_tokenizer_class(folder / "tokenizer_config.json")
    return sorted(set(os.listdir(folder)) - before)


def _plain_tokenizer_class(path: Path) -> None:
    """Name the generic fast tokenizer, so engines load tokenizer.json as written instead of rebuilding
    it from a family's rules (transformers 5 rebuilds StableLM-2's with GPT-2's split rule)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # how it was loaded here, not a property of the tokenizer
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- the record -----------------------------------------------------------------------------------

def _model_record(model, plan: LlavaPlan, image_token_id: int, vocab: int) -> dict:
    from tinyllava_edge.model.vision import tower_for_config

    config = model.config
    return {
        "llm_family": config.llm_family,
        "vision_tower": tower_for_config(config.vision_config).key,
        "connector": config.connector_type,
        "hidden_size": config.hidden_size,
        "image_tokens": plan.image_tokens,
        "image_token_index": image_token_id,
        "vocab_size": vocab,
        "vocab_size_checkpoint": int(config.text_config.vocab_size),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "llava_vision_feature_select_strategy": plan.strategy,
        "projector_scale": plan.projector_scale,
        "image_aspect_ratio": config.image_aspect_ratio,
    }


def _plain_record(path: Path) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
