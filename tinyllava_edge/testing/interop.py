"""Checkpoints we write, with what our code computes from them, for other code to read and compare.

One case per LLM family x vision tower miniature (`llama-siglip`, ..., `gemma-dinov2`) plus the
default model (`tiny-shapes`, the preset with random weights). `write_cases(out)` saves each as
`out/<case>/` (`save_pretrained`: the TinyLLaVA_Factory layout) and `out/<case>.reference.safetensors`
with fixed inputs and our outputs:

* `input_ids` (1, T) and the LLM's `llm_logits` (1, T, V);
* `pixel_values` (1, 3, H, W) and every hidden state of the tower, `tower_hidden_states`
  (L + 1, 1, N, C): embeddings first, as `output_hidden_states` returns them;
* `mm_input_ids`, the same tokens with the image placeholder (-200) after the fourth one, and
  the whole model's `mm_logits` (1, T + image rows - 1, V).

CI's transformers-4.40 step (tests/test_tf440.py) and benchmarks/factory_crosscheck.py read the
checkpoints with other code and compare against these. Importing this module is light (the case
names only), so the transformers-4.40 environment can import it too; writing needs our model code.

    python -m tinyllava_edge.testing.interop OUT [--cases llama-siglip,tiny-shapes]
"""

from __future__ import annotations

import argparse
from pathlib import Path

FAMILIES = ("llama", "qwen2", "phi", "stablelm", "gemma")
TOWERS = ("siglip", "clip", "dinov2")
DEFAULT_CASE = "tiny-shapes"
CASES = tuple(f"{family}-{tower}" for family in FAMILIES for tower in TOWERS) + (DEFAULT_CASE,)
VOCAB = 256  # miniatures; the default model gets its own tokenizer's size
SEQ_LEN = 12
IMAGE_AT = 4  # the placeholder goes after this many tokens
SEED = 0


def reference_path(out: Path, case: str) -> Path:
    return Path(out) / f"{case}.reference.safetensors"


def build_case(case: str, seed: int = SEED):
    """Our model for a case, with deterministic random weights (large enough that logits differ)."""
    from tinyllava_edge.data.shapes_tokenizer import DEFAULT_VOCAB_SIZE
    from tinyllava_edge.errors import TinyLlavaError
    from tinyllava_edge.model.presets import get_preset
    from tinyllava_edge.testing.checkpoints import miniature_config, random_model

    if case == DEFAULT_CASE:
        return random_model(get_preset(DEFAULT_CASE).config(DEFAULT_VOCAB_SIZE), seed)
    family, _, tower = case.partition("-")
    if family not in FAMILIES or tower not in TOWERS:
        raise TinyLlavaError(f"unknown interop case {case!r}; known: {', '.join(CASES)}")
    return random_model(miniature_config(family, tower, VOCAB), seed)


def case_inputs(model, seed: int = SEED) -> dict:
    import torch

    from tinyllava_edge.constants import IMAGE_TOKEN_INDEX

    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    size = model.config.vision_config.image_size
    ids = torch.randint(3, vocab, (1, SEQ_LEN), generator=generator)
    pixels = torch.randn(1, 3, size, size, generator=generator)
    placeholder = torch.tensor([[IMAGE_TOKEN_INDEX]])
    mm_ids = torch.cat([ids[:, :IMAGE_AT], placeholder, ids[:, IMAGE_AT:]], dim=1)
    return {"input_ids": ids, "pixel_values": pixels, "mm_input_ids": mm_ids}


def our_outputs(model, inputs: dict) -> dict:
    """What our code computes from a case's inputs (see the module docstring)."""
    import torch

    with torch.no_grad():
        llm = model.language_model(input_ids=inputs["input_ids"]).logits
        tower = model.vision_tower._vision_tower(inputs["pixel_values"], output_hidden_states=True)
        whole = model(input_ids=inputs["mm_input_ids"], images=inputs["pixel_values"]).logits
    return {"llm_logits": llm, "tower_hidden_states": torch.stack(tower.hidden_states), "mm_logits": whole}


def write_cases(out: str | Path, cases: tuple[str, ...] = CASES) -> Path:
    """Save every case's checkpoint and reference file under `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        model = build_case(case)
        model.save_pretrained(out / case)
        inputs = case_inputs(model)
        tensors = {**inputs, **our_outputs(model, inputs)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(reference_path(out, case)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyllava_edge.testing.interop", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="directory to write the checkpoints and reference files to")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    args = parser.parse_args(argv)
    cases = tuple(c for c in args.cases.split(",") if c)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {', '.join(unknown)}; known: {', '.join(CASES)}")
    import torch

    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    write_cases(args.out, cases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
