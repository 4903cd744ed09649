"""The HF LLaVA folder's fidelity check: what `export_hf(verify=True)` measures and records.

One side is transformers alone: `LlavaForConditionalGeneration` and `AutoProcessor` loaded from
the folder, given the raw image and the question as chat messages (`apply_chat_template`), as an
engine's user would. No project code is on that path. The other side is our model with the
project's own preprocessing, template and Factory tokenization. Measured per prompt, in fp32:
whether the ids agree (the image run collapsed to the -200 placeholder) and the pixels, the max
|logit difference| over every position, and the greedy tokens. Required: identical ids and
greedy tokens, logits within the tolerance.
"""

from __future__ import annotations

from pathlib import Path

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from tinyllava_edge.errors import TinyLlavaError


def check_hf_export(model, tokenizer, folder: Path, image_token_id: int, *, n_images: int, new_tokens: int,
                    logits_tol: float) -> dict:
    """Compare the folder, read by transformers, with `model`; returns the figures, raises on a failure."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tinyllava_edge.data.preprocess import preprocess
    from tinyllava_edge.data.template import default_template_for_family, get_template, tokenizer_image_token
    from tinyllava_edge.export.checks import QUESTIONS, synthetic_images
    from tinyllava_edge.export.onnx_vision import preprocess_config

    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    template = get_template(default_template_for_family(model.config.llm_family))
    pre = preprocess_config(model)
    vocab = int(model.config.text_config.vocab_size)
    greedy = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    prompts = []
    for i, array in enumerate(synthetic_images(n_images)):
        image = Image.fromarray(array)
        question = QUESTIONS[i % len(QUESTIONS)]
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        ids = tokenizer_image_token(template.render_prompt(f"{DEFAULT_IMAGE_TOKEN}\n{question}"), tokenizer)
        pixels = torch.from_numpy(preprocess(image, pre))
        with torch.no_grad():
            theirs = hf(**inputs).logits[0]  # (T, vocab of the folder)
            ours = model(input_ids=torch.tensor([ids]), images=pixels).logits[0]  # (T, vocab)
            their_tokens = hf.generate(**inputs, **greedy)[0, inputs["input_ids"].shape[1]:].tolist()
            our_tokens = model.generate(torch.tensor([ids]), images=pixels, **greedy)[0].tolist()
        collapsed = collapse_image_tokens(inputs["input_ids"][0].tolist(), image_token_id)
        same_ids = collapsed == ids
        same_shape = theirs.shape[0] == ours.shape[0]
        prompts.append({
            "image_size": list(array.shape[:2]),
            "question": question,
            "ids_identical": same_ids,
            "pixels_max_abs_diff": float((inputs["pixel_values"][0] - pixels[0]).abs().max()),
            "image_tokens": int((inputs["input_ids"][0] == image_token_id).sum()),
            "logits_max_abs_diff": float((theirs[:, :vocab] - ours).abs().max()) if same_shape else None,
            "logits_max_abs": float(ours.abs().max()),
            # the added <image> row (if any): a zero row, so this logit is 0 and never the greedy pick
            "added_rows_max_logit": float(theirs[:, vocab:].max()) if same_shape and theirs.shape[1] > vocab else None,
            "greedy_identical": their_tokens == our_tokens,
            "tokens": our_tokens,
        })
    figures = {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "logits_tolerance": logits_tol,
        "ids_identical": sum(p["ids_identical"] for p in prompts),
        "greedy_identical": sum(p["greedy_identical"] for p in prompts),
        "logits_max_abs_diff": max((p["logits_max_abs_diff"] for p in prompts
                                    if p["logits_max_abs_diff"] is not None), default=None),
        "pixels_max_abs_diff": max(p["pixels_max_abs_diff"] for p in prompts),
        "reference": "transformers LlavaForConditionalGeneration + AutoProcessor.apply_chat_template from the folder",
        "per_prompt": prompts,
    }
    _require(figures)
    return {"transformers_llava": figures}


def collapse_image_tokens(ids: list[int], image_token_id: int) -> list[int]:
    """LLaVA's ids with each run of image tokens replaced by one -200 (Factory's placeholder)."""
    out: list[int] = []
    for token in ids:
        if token == image_token_id:
            if not out or out[-1] != IMAGE_TOKEN_INDEX:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(token)
    return out


def _require(figures: dict) -> None:
    n = figures["prompts"]
    if figures["ids_identical"] != n:
        raise TinyLlavaError(f"check 'HF LLaVA token ids' failed: transformers' processor gives other ids than the "
                             f"model's template on {n - figures['ids_identical']} of {n} prompts")
    diff, tol = figures["logits_max_abs_diff"], figures["logits_tolerance"]
    if diff is None or diff > tol:
        raise TinyLlavaError(f"check 'HF LLaVA logits vs PyTorch' failed: max abs diff {diff:.3g} > {tol:g}"
                             if diff is not None else "check 'HF LLaVA logits vs PyTorch' failed: the sequences "
                             "differ in length (image-token count)")
    if figures["greedy_identical"] != n:
        raise TinyLlavaError(f"check 'HF LLaVA greedy tokens' failed: {n - figures['greedy_identical']} of {n} "
                             "prompts decode differently through transformers' LLaVA")
