"""The tenth look's stage-1 caption variants (docs/tiny-shapes-training.md): an experiment record, not a tool.

Generates the seed's shapes data (generator version 4), builds one caption file per stage-1 phase
from the colour-first captions (a share of the images, drawn per image from the stream
[seed, 777], named shape first without cells: "circle red, square blue." with form "sf", or
"the circle is red, the square is blue." with form "is"), trains the phases one after another
(lr 3e-4, AdamW, cosine, 3 % warm-up each), then the recipe's stage 2, and scores val and test.

    python docs/experiments/stage1_caption_variants.py --seed 0 --out /tmp/v --phases \
        '[{"share": 0.0, "steps": 1200, "batch": 16}, {"share": 0.75, "steps": 600, "batch": 32}]'   # B
    ... --phases '[{"share": 0.5, "steps": 1600, "batch": 32, "form": "is"}]'                       # C
    ... --phases '[{"share": 0.5, "steps": 1600, "batch": 32}]'                                     # A
    ... --phases '[{"share": 0.5, "steps": 1600, "batch": 32}]' --heads 8                           # D
    ... --phases '[{"share": 0.25, "steps": 1600, "batch": 32}]'                                    # E
    ... --phases '[{"share": 0.5, "steps": 1600, "batch": 32, "marker": "shapes:"}]'                  # G
    ... --phases '[{"share": 0.25, "steps": 2000, "batch": 32}]' --s2 '{"max_steps": 1400}'         # E2 (adopted)
"""
import os, sys, json, time, argparse
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
from pathlib import Path
import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, required=True)
p.add_argument("--out", required=True)
p.add_argument("--phases", required=True, help='[{"share":0.0,"steps":1200,"batch":16}, ...]')
p.add_argument("--s2", default="{}")
p.add_argument("--heads", type=int, default=None, help="the LLM's attention heads (the preset's: 4)")
a = p.parse_args()

if a.heads:
    import dataclasses
    from tinyllava_edge.model import presets
    base = presets.PRESETS["tiny-shapes"]
    presets.PRESETS["tiny-shapes"] = dataclasses.replace(
        base, text={**base.text, "num_attention_heads": a.heads, "num_key_value_heads": a.heads})

from tinyllava_edge.data.shapes import write_dataset
from tinyllava_edge.data.shapes_tokenizer import train_shapes_tokenizer
from tinyllava_edge.train.run import train
from tinyllava_edge.train.config import TrainConfig
from tinyllava_edge.train.preset_recipes import PRESET_RECIPES, evaluate_shapes

recipe = PRESET_RECIPES.get("tiny-shapes")
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
times = {}
t0 = time.perf_counter()
write_dataset(out / "data", seed=a.seed, **recipe.dataset)
train_shapes_tokenizer(out / "tokenizer", seed=a.seed)
times["data"] = time.perf_counter() - t0

instruct = json.load(open(out / "data" / "instruct.json"))
colour_first = [r["conversations"][-1]["value"] for r in instruct]

def caption_file(ph, k):
    share = ph['share']
    rng = np.random.default_rng([a.seed, 777])
    recs = []
    for r, text in zip(instruct, colour_first):
        if rng.random() < share:
            if ph.get("form", "sf") == "sf":
                text = ", ".join(" ".join(part.split(" ")[1::-1]) for part in text[:-1].split(", ")) + "."
            else:
                text = ", ".join("the {1} is {0}".format(*part.split(" ")[:2]) for part in text[:-1].split(", ")) + "."
            if ph.get("marker"):  # the shape-first form opened by a word of its own: "shapes: circle red, ..."
                text = ph["marker"] + " " + text
        recs.append({"id": r["id"].replace("instruct", "caption"), "image": r["image"],
                     "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": text}],
                     "kind": "caption"})
    name = f"phase{k}_{share}.json"
    json.dump(recs, open(out / "data" / name, "w"))
    return name, [x["conversations"][1]["value"] for x in recs[:3]]

tune = {"recipe": "custom", "tune_llm": "full", "tune_vision": "frozen", "tune_connector": "full"}
prev = None
for k, ph in enumerate(json.loads(a.phases)):
    name, ex = caption_file(ph, k)
    print("phase", k, ph, ex, flush=True)
    source = {"model": str(prev)} if prev else {"preset": "tiny-shapes", "tokenizer": str(out / "tokenizer")}
    cfg = TrainConfig(**source, data=str(out / "data" / name), output=str(out / f"pretrain{k}"), seed=a.seed,
                      quiet=True, overwrite=True, stage="pretrain", **tune, lr=3e-4, connector_lr=3e-4,
                      batch_size=ph["batch"], max_steps=ph["steps"], warmup_ratio=0.03)
    t = time.perf_counter(); train(cfg); times[f"pretrain{k}"] = time.perf_counter() - t
    print(f"pretrain{k} {times[f'pretrain{k}']:.1f}s", flush=True)
    prev = out / f"pretrain{k}"
opts = {**recipe.stages[-1].options, **json.loads(a.s2)}
cfg = TrainConfig(model=str(prev), data=str(out / "data" / "instruct.json"), output=str(out / "model"), seed=a.seed,
                  quiet=True, overwrite=True, **opts)
t = time.perf_counter(); train(cfg); times["model"] = time.perf_counter() - t
print(f"model {opts} {times['model']:.1f}s", flush=True)
res = {}
for split in ("val", "test"):
    res[split] = evaluate_shapes(out / "model", out / "data", out / f"eval_{split}", split, 64, True)
    print(split, round(res[split]["exact_match"], 2), {k: round(v, 1) for k, v in res[split]["per_kind"].items()}, flush=True)
json.dump({"args": vars(a), "times": times, "eval": res}, open(out / "variant.json", "w"), indent=1)
