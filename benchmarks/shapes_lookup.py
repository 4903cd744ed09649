"""Lookup probe of a shapes checkpoint: accuracy by object count against the random-object baseline.

    python benchmarks/shapes_lookup.py --model runs/tiny-shapes/model [--n 400] [--json out.json]

Asks "Where is the purple triangle?", "What shape is the red object?" and "What colour is the
square?" about every object of the first N test scenes that the description singles out
(tinyllava_edge/eval/shapes_lookup.py says why), greedy, and prints a markdown table. Also prints
the mean norm of the image tokens the connector hands the LLM beside the mean norm of its text
embeddings: the two streams the LLM's first layer mixes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint trained on shapes data")
    parser.add_argument("--n", type=int, default=400, help="test scenes to ask about (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the generator seed the data was made with")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tinyllava_edge.data.preprocess import preprocess
    from tinyllava_edge.data.shapes import ShapesConfig, scenes
    from tinyllava_edge.errors import TinyLlavaError
    from tinyllava_edge.eval.predictor import TorchPredictor
    from tinyllava_edge.eval.shapes_lookup import markdown_rows, run_lookup

    if args.n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    try:
        predictor = TorchPredictor(args.model, batch_size=64, max_new_tokens=8)
    except TinyLlavaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = predictor.model
    size = model.config.vision_config.image_size
    config = ShapesConfig(seed=args.seed, image_size=size)
    scores = run_lookup(predictor.predict, config, "test", args.n)

    images = [s.image for s in scenes(config, "test", min(args.n, 100))]
    with torch.no_grad():
        tokens = model.encode_images(torch.from_numpy(preprocess(images, predictor.preprocess_config)))
        text = model.get_input_embeddings().weight.detach()
    norms = {"image_token_norm": round(float(tokens.norm(dim=-1).mean()), 3),
             "text_embedding_norm": round(float(text.norm(dim=-1).mean()), 3)}
    figures = {"command": "python benchmarks/shapes_lookup.py", "model": str(args.model), "scenes": args.n,
               "lookup": scores, **norms}
    print("\n".join(markdown_rows(scores)))
    print(f"\nimage tokens: mean norm {norms['image_token_norm']}; text embeddings: mean norm "
          f"{norms['text_embedding_norm']} (ratio {norms['image_token_norm'] / max(norms['text_embedding_norm'], 1e-9):.0f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
