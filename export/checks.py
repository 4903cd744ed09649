"""The bundle's checks against PyTorch: what `export_bundle(verify=True)` measures and records.

* **LLM with an image.** Prompts built with the checkpoint's chat template (`Template.encode`,
  `-200` where the image goes) run through llama.cpp by `tinyllava_edge.llamacpp` the way the
  edge runtime will: text tokenized by llama.cpp, the image as embedding rows from the bundle's
  `vision.onnx`, greedy decoding. PyTorch then runs each prompt once, teacher-forced: the prompt
  (transformers' ids) followed by llama.cpp's answer, one forward with no KV cache, which gives
  PyTorch's logits at every step of that answer. Measured: max |logit difference| at the prompt's
  last position, and whether PyTorch's greedy choice at every step is llama.cpp's token (then
  PyTorch's own greedy decoding is the same answer; at the first step where it is not, the two
  decodings part, and PyTorch's margin there says whether it is a rounding tie).
* **Tokenizer parity.** transformers' ids against llama.cpp's on a corpus of unicode, digits,
  whitespace runs, special tokens and template text, and on the encoded prompts themselves.
* **Input-embedding scale.** How the llama.cpp in use treats injected rows, probed once per file
  (see :func:`probe_embd_scale`); the factor goes into the manifest for the runtime.
* **mmproj.** `measure_mmproj`'s figures (stock llama.cpp against PyTorch); recorded, never failed.

Tolerances are stated as data next to the bit width that applies them (`bundle.PRECISIONS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.llamacpp import LlamaCppModel, LlamaCppTokenizer, split_segments

# Questions asked about the synthetic images, cycled.
QUESTIONS = (
    "What is in the picture?",
    "Describe the image in detail.",
    "What colour is the largest shape?",
    "How many shapes are there?",
    "Is there a circle in the image? Answer yes or no.",
)

# Tokenizer corpus: scripts, emoji (multi-codepoint too), digits, whitespace runs, code, and
# text that starts with spaces. Special tokens and template text are added per tokenizer.
PARITY_TEXTS = (
    "Hello world",
    "café naïve 日本語 😀 Ünïcödé straße",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "a😀b👍🏽c ✨ 🇩🇪 👨‍👩‍👧",
    "12345 and 3.14159, 1,000,000 or 2026-11-26 at 07:45",
    "It's I'M we'll they've",
    "    four spaces\ttab\t\ttwo tabs",
    "line\n\nbreaks\r\n end ",
    "trailing spaces   ",
    "def f(x):\n\treturn x  +  1\n",
    " leading space",
    "  two leading spaces",
    "A red circle, a blue square and 3 green triangles.",
)

# What llama.cpp's input-embedding path may do to injected rows, relative to transformers'
# `get_input_embeddings()` output: nothing, or what llama.cpp 0.3.36's gemma graph does (every
# input row times sqrt(n_embd), injected rows included; upstream src/models/gemma.cpp now scales
# token rows only, "not raw vector embeddings (e.g. visual tokens from mmproj)").
_SCALE_CANDIDATES = {"none": lambda n_embd: 1.0, "divide by sqrt(n_embd)": lambda n_embd: 1.0 / math.sqrt(n_embd)}
_SCALE_PROBE_TOL = 0.05  # relative logit gap a matching candidate stays under (a wrong one: ~0.3)


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` RGB uint8 images (H, W, 3) of varied, non-square sizes: noise and drawn shapes in turn."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        height, width = (int(v) for v in rng.integers(24, 97, size=2))
        if i % 2 == 0:
            images.append(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
            continue
        image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
            x1, y1 = int(rng.integers(x0 + 4, width)), int(rng.integers(y0 + 4, height))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif kind == 1:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
        images.append(np.asarray(image, dtype=np.uint8))
    return images


def image_prompt(index: int) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + QUESTIONS[index % len(QUESTIONS)]}]


# -- tokenizer parity -------------------------------------------------------------------------------

def _prefix_first_metaspace(tokenizer) -> bool:
    """True for a SentencePiece tokenizer converted with Metaspace(prepend_scheme="first").

    transformers adds the dummy-prefix "▁" only at the very start of such text, and not when it
    already starts with a space; sentencepiece-style llama.cpp (add_space_prefix) adds it to
    every text fragment, including those that start with a space and those after a special
    token. (tinyllava_edge/testing/tokenizers.py, tinyllama; tests/test_export_gguf.py.)
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    text = repr(backend.pre_tokenizer) + repr(backend.normalizer)
    return "Metaspace" in text and "prepend_scheme=first" in text


def parity_corpus(tokenizer, template) -> list[str]:
    """PARITY_TEXTS plus this tokenizer's special tokens inside text and the template's text."""
    specials = [t for t in dict.fromkeys(tokenizer.all_special_tokens) if t]
    with_specials = [f"Answer.{t}USER: next" for t in specials] + [f"{t}" for t in specials]
    if len(specials) >= 2:
        with_specials.append(f"{specials[0]} and {specials[1]}x")
    prompt = template.render_prompt("<image>\nWhat is in the picture?")
    conversation = template.render([{"from": "human", "value": "<image>\nWhat is it?"},
                                    {"from": "gpt", "value": "A red circle."},
                                    {"from": "human", "value": "And  the\tcolour?"},
                                    {"from": "gpt", "value": "Red."}])
    chunks = [c for c in prompt.split("<image>") if c]
    return list(dict.fromkeys([*PARITY_TEXTS, *with_specials, prompt, conversation, *chunks]))


def tokenizer_parity(tokenizer, llm: LlamaCppModel, template) -> dict:
    """transformers vs llama.cpp ids on `parity_corpus` and on encoded image prompts.

    Texts hit by the documented Metaspace(prepend_scheme="first") difference (see
    `_prefix_first_metaspace`: text starting with a space, text after a special token) are listed
    under `known_deviation` and left out of `percent`; every other text must match.
    """
    quirk = _prefix_first_metaspace(tokenizer)
    specials = [t for t in tokenizer.all_special_tokens if t]
    compared = equal = 0
    mismatched: list[str] = []
    known: list[str] = []
    for text in parity_corpus(tokenizer, template):
        expected = list(tokenizer(text)["input_ids"])
        got = llm.tokenize(text, add_special=True, parse_special=True)
        if quirk and (text.startswith(" ") or _text_after_special(text, specials)):
            if got != expected:
                known.append(text)
            continue
        compared += 1
        equal += got == expected
        if got != expected:
            mismatched.append(text)
    adapter = LlamaCppTokenizer(llm, tokenizer)
    for i in range(len(QUESTIONS)):
        compared += 1
        same = (template.encode(image_prompt(i), tokenizer, mode="eval")["input_ids"]
                == template.encode(image_prompt(i), adapter, mode="eval")["input_ids"])
        equal += same
        if not same:
            mismatched.append(template.render_prompt(image_prompt(i)))
    report = {
        "compared": compared,
        "equal": equal,
        "percent": 100.0 * equal / compared,
        "mismatched": mismatched,
        "known_deviation": known,
    }
    if quirk:
        report["known_deviation_reason"] = (
            "transformers' Metaspace(prepend_scheme='first') tokenizer adds no '▁' to text that starts with a space "
            "or follows a special token, llama.cpp (add_space_prefix) does; multi-turn prompts (text after the "
            "eos) tokenize differently in llama.cpp"
        )
    return report


def _text_after_special(text: str, specials: Sequence[str]) -> bool:
    return any(s in text and any(part for part in text.split(s)[1:]) for s in specials)


# -- input-embedding scale --------------------------------------------------------------------------

def probe_embd_scale(llm: LlamaCppModel, rows: np.ndarray, ids: Sequence[int]) -> dict:
    """The factor injected rows need so llama.cpp treats them as transformers does.

    `rows` are transformers' input embeddings of `ids` (the embedding matrix's rows: only that
    tensor is needed, not the model). Decodes the same text once as token ids and once as those
    rows times each candidate factor; the factor whose logits match the token path is the one.
    """
    ids = [int(i) for i in ids]
    rows = np.asarray(rows, dtype=np.float32)
    reference = llm.prefill([ids])
    scale = max(1.0, float(np.abs(reference).max()))
    gaps = {}
    for name, factor in _SCALE_CANDIDATES.items():
        value = factor(llm.n_embd)
        gaps[name] = (value, float(np.abs(llm.prefill([rows * value]) - reference).max()) / scale)
    best = min(gaps, key=lambda k: gaps[k][1])
    value, gap = gaps[best]
    if gap > _SCALE_PROBE_TOL:
        raise TinyLlavaError(
            f"llama.cpp treats injected embeddings of {llm.path.name} in a way none of the known scalings match "
            f"(best: {best}, relative logit gap {gap:.3g}); image embeddings cannot be fed to it"
        )
    return {"embd_input_scale": value, "rule": best, "relative_logit_gap": gap,
            "gaps": {k: v[1] for k, v in gaps.items()}}


# -- PyTorch in float32 over narrower stored weights ------------------------------------------------

@contextmanager
def computed_in_fp32(model) -> Iterator[None]:
    """Run `model` (weights stored in bf16/fp16) in float32, one block's weights widened at a time.

    Each block (a decoder or encoder layer, the patch embedding, the connector: the largest
    subtrees no bigger than the largest single module left) gets its weights widened just before
    its forward and narrowed back right after (exact: a bf16 value is a float32 value). Whole
    blocks, not single matrices, because modules cast their inputs to their children's dtype
    (SigLIP's patch embedding does), which must then read float32. Two matrices are never widened
    whole, being the largest of an LLM (Phi-2: 0.5 GB each in float32): a plain `nn.Embedding`
    looks its rows up in the stored dtype and widens only those, and the output layer (a plain
    `nn.Linear`) widens a slice of its rows at a time. A 3B reference then costs its stored bytes
    plus one decoder layer in float32, and computes what a float32 copy of the same weights
    computes; image pixels go in as float32 too. What the checks measure is then the file's
    rounding against float32 arithmetic, with the float32 tolerances.
    """
    import torch

    head = model.language_model.get_output_embeddings() if hasattr(model, "language_model") else None
    if type(head) is not torch.nn.Linear:
        head = None
    lookups = [m for m in model.modules() if type(m) is torch.nn.Embedding]
    apart = {id(p) for m in [*lookups, *([head] if head is not None else [])] for p in m.parameters()}

    def narrow_bytes(module, recurse: bool) -> int:
        return sum(4 * p.numel() for p in module.parameters(recurse=recurse)
                   if p.is_floating_point() and p.dtype != torch.float32 and id(p) not in apart)

    limit = max((narrow_bytes(m, False) for m in model.modules()), default=0)
    blocks = []

    def choose(module) -> None:
        total = narrow_bytes(module, True)
        if total == 0:
            return
        if total <= limit:
            blocks.append(module)
            return
        if narrow_bytes(module, False):
            blocks.append(module)  # its own matrices are the largest; children get their own blocks
        for child in module.children():
            choose(child)

    def widen(module, args):
        recurse = module not in own_only
        narrow = [(p, p.data) for p in module.parameters(recurse=recurse)
                  if p.is_floating_point() and p.dtype != torch.float32]
        module._narrow_weights = narrow
        for param, data in narrow:
            param.data = data.float()

    def restore(module, args, output):
        for param, data in module.__dict__.pop("_narrow_weights", []):
            param.data = data

    def looked_up_in_fp32(module, args, output):
        return output.float() if output.is_floating_point() else output

    def head_in_slices(hidden):
        weight, bias = head.weight, head.bias
        if weight.dtype == torch.float32:
            return torch.nn.functional.linear(hidden, weight, bias)
        rows = max(1, limit // (4 * weight.shape[1])) if limit else weight.shape[0]
        hidden = hidden.float()
        return torch.cat([torch.nn.functional.linear(hidden, weight[i:i + rows].float(),
                                                     None if bias is None else bias[i:i + rows].float())
                          for i in range(0, weight.shape[0], rows)], dim=-1)

    choose(model)
    own_only = {m for m in blocks if narrow_bytes(m, True) > limit}
    handles = []
    for block in blocks:
        handles += [block.register_forward_pre_hook(widen), block.register_forward_hook(restore)]
    handles += [m.register_forward_hook(looked_up_in_fp32) for m in lookups]
    if head is not None:
        head.forward = head_in_slices
    encode = model.__dict__.get("encode_images")

    def encode_images(pixel_values):  # the model's own casts pixels to its (narrow) dtype
        config = model.config
        features = model.vision_tower(pixel_values.to(torch.float32), layer=config.vision_feature_layer,
                                      strategy=config.vision_feature_select_strategy)
        return model.connector(features)

    model.encode_images = encode_images
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if head is not None:
            del head.forward
        if encode is None:
            del model.encode_images
        else:
            model.encode_images = encode


# -- LLM with images --------------------------------------------------------------------------------

def check_prompts(tokenizer, template, images: Sequence[np.ndarray], pre) -> list[dict]:
    """The image prompts of the checks: per image its messages, transformers' ids, the
    preprocessed pixels (`pre`, a PreprocessConfig), the image's shape and the stop ids."""
    from tinyllava_edge.data.preprocess import preprocess

    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = []
    for i, image in enumerate(images):
        messages = image_prompt(i)
        prompts.append({"messages": messages, "hf_ids": template.encode(messages, tokenizer, mode="eval")["input_ids"],
                        "pixels": preprocess(image, pre), "image_shape": list(np.asarray(image).shape),
                        "stop": stop})
    return prompts


def llamacpp_runs(prompts: Sequence[dict], tokenizer, template, llm: LlamaCppModel,
                  image_rows: Sequence[np.ndarray], *, new_tokens: int, embd_scale: float) -> list[dict]:
    """llama.cpp's side of the check: per prompt its ids (llama.cpp's tokenizer), the image rows
    it was given (`image_rows[i]`, the bundle's vision graph on the prompt's pixels, times
    `embd_scale`), its greedy tokens (stopping at the prompt's stop ids) and the prompt's
    last-position logits. A quantized file's check decodes the same ids and rows
    (quant/fidelity.py), so these runs stand in for the 16-bit file there."""
    adapter = LlamaCppTokenizer(llm, tokenizer)
    runs = []
    for prompt, image in zip(prompts, image_rows, strict=True):
        ids = template.encode(prompt["messages"], adapter, mode="eval")["input_ids"]
        rows = np.asarray(image, dtype=np.float32) * np.float32(embd_scale)
        tokens, logits = llm.generate(split_segments(ids, [rows]), new_tokens, stop_ids=prompt["stop"],
                                      return_logits=True)
        runs.append({"ids": ids, "rows": rows, "stop": list(prompt["stop"]), "new_tokens": new_tokens,
                     "tokens": list(tokens),
                     "first_logits": np.asarray(logits, dtype=np.float32)})
    return runs


def torch_teacher_forced(model, prompts: Sequence[dict], runs: Sequence[dict]) -> list[np.ndarray]:
    """PyTorch's logits at each step of llama.cpp's answers: per prompt one forward, no KV cache,
    over transformers' prompt ids followed by llama.cpp's tokens but the last; returns (k, vocab)
    float32 per prompt, k = the answer's length, row 0 at the prompt's last position.

    One pass instead of a prefill and k - 1 decoding steps: the weights are read (and widened,
    under `computed_in_fp32`) once per prompt, and no KV cache is held. Up to the first step
    where PyTorch's argmax is not llama.cpp's token, PyTorch's own greedy decoding would have
    produced exactly these tokens, so the comparison is the same as two independent decodings.
    """
    import inspect

    import torch

    from tinyllava_edge.memory import release_freed_memory

    keeps = "logits_to_keep" in inspect.signature(model.language_model.forward).parameters
    out = []
    for prompt, run in zip(prompts, runs, strict=True):
        k = max(1, len(run["tokens"]))
        ids = list(prompt["hf_ids"]) + list(run["tokens"][:-1])
        extra = {"logits_to_keep": k} if keeps else {}
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), images=torch.from_numpy(prompt["pixels"]), use_cache=False,
                           **extra).logits
        out.append(logits[0, -k:].float().numpy().copy())
        del logits
        release_freed_memory()  # each prompt's activations go back to the system before the next one
    return out


def compare_with_images(prompts: Sequence[dict], runs: Sequence[dict], torch_logits: Sequence[np.ndarray], *,
                        new_tokens: int, logits_tol: float) -> dict:
    """Prompt logits and greedy tokens, llama.cpp (`llamacpp_runs`) against PyTorch
    (`torch_teacher_forced`), per image prompt.

    A greedy disagreement is a `tie` when, at the first differing step, PyTorch's own logits for
    its choice and llama.cpp's token are closer than `logits_tol` (relative): a rounding
    difference may pick either.
    """
    records = []
    for prompt, run, logits in zip(prompts, runs, torch_logits, strict=True):
        reference = logits[0]
        scale = max(1.0, float(np.abs(reference).max()))
        diff = float(np.abs(run["first_logits"] - reference).max())
        edge_tokens = run["tokens"]
        torch_tokens = [int(t) for t in logits.argmax(-1)][:len(edge_tokens)]
        record = {
            "question": prompt["messages"][0]["value"].split("\n", 1)[1],
            "image_shape": prompt["image_shape"],
            "prompt_ids_equal": run["ids"] == prompt["hf_ids"],
            "logits_max_abs_diff": diff,
            "logits_rel_diff": diff / scale,
            "torch_tokens": torch_tokens,
            "llamacpp_tokens": edge_tokens,
            "greedy_identical": edge_tokens == torch_tokens,
        }
        if not record["greedy_identical"]:
            step = next(k for k, (a, b) in enumerate(zip(torch_tokens, edge_tokens)) if a != b)
            at = logits[step]
            margin = float(at[torch_tokens[step]] - at[edge_tokens[step]])
            record.update(first_difference=step, torch_margin=margin,
                          tie=margin / max(1.0, float(np.abs(at).max())) <= logits_tol)
        records.append(record)
    return {
        "prompts": len(records),
        "new_tokens": new_tokens,
        "torch_side": "teacher-forced: one forward per prompt over the prompt and llama.cpp's answer",
        "logits_max_abs_diff": max(p["logits_max_abs_diff"] for p in records),
        "logits_rel_diff": max(p["logits_rel_diff"] for p in records),
        "greedy_identical": sum(p["greedy_identical"] for p in records),
        "greedy_ties": sum(bool(p.get("tie")) for p in records),
        "prompt_ids_equal": sum(p["prompt_ids_equal"] for p in records),
        "per_prompt": records,
    }


# -- mmproj -----------------------------------------------------------------------------------------

def mmproj_image(model, seed: int = 0) -> np.ndarray:
    """A square noise image at the tower's size (both preprocessings are then the identity)."""
    size = model.config.vision_config.image_size
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def mmproj_figures(mmproj_path: Path, llm_path: Path, model, seed: int = 0,
                   torch_embeds: np.ndarray | None = None) -> dict:
    """`measure_mmproj` on `mmproj_image(model, seed)`; `torch_embeds`, PyTorch's rows for that
    image computed beforehand, spare holding the model while llama.cpp loads the text GGUF."""
    from tinyllava_edge.export.validate import measure_mmproj

    m = measure_mmproj(mmproj_path, llm_path, model, mmproj_image(model, seed), torch_embeds=torch_embeds)
    keep = ("n_tokens_stock", "n_tokens_torch", "aligned", "min_cosine", "mean_cosine", "max_abs_diff", "max_rel_diff")
    return {k: m[k] for k in keep}
