"""`tinyllava-train --preset tiny-shapes`: the whole recipe, run small (the full run is benchmarks/tiny_shapes.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.train.preset_recipes import PRESET_RECIPES, SUMMARY_FILE, recipe_description, train_preset

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = {"n_train": 24, "n_val": 4, "n_test": 12}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "tiny"
    lines = []
    summary = train_preset("tiny-shapes", out, quiet=True, log=lines.append, dataset_overrides=SMALL_DATA,
                           max_steps=2, batch_size=4)
    return out, summary, lines


def test_every_preset_has_a_recipe_and_every_recipe_a_preset():
    from tinyllava_edge.model.presets import PRESETS

    assert set(PRESET_RECIPES) == set(PRESETS)
    for name in PRESET_RECIPES:
        assert recipe_description(name)["stages"]


def test_the_recipe_writes_data_tokenizer_both_stages_and_an_evaluation(run):
    out, summary, lines = run
    assert [s["step"] for s in summary["steps"]] == ["data", "tokenizer", "pretrain", "model", "eval"]
    assert len(lines) == 5 and lines[0].startswith("[1/5] shapes data")
    for folder in ("data", "tokenizer", "pretrain", "model", "eval"):
        assert (out / folder).is_dir(), folder
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    # stage 1 starts from the preset, stage 2 from stage 1, each with its stage's data and template
    pre = json.loads((out / "pretrain" / "train_summary.json").read_text())
    fin = json.loads((out / "model" / "train_summary.json").read_text())
    assert pre["stage"] == "pretrain" and pre["template"] == "pretrain" and "preset 'tiny-shapes'" in pre["start"]
    assert fin["stage"] == "finetune" and fin["template"] == "llama" and fin["start"] == str(out / "pretrain")
    assert fin["tune_types"] == {"llm": "full", "vision_tower": "frozen", "connector": "full", "vision_from_layer": None}
    ev = summary["eval"]
    assert ev["n"] == json.loads((out / "eval" / "results.json").read_text())["metrics"]["n"] > 0
    assert set(ev["per_kind"]) <= {"shape", "colour", "count", "position", "exists"}


def test_the_tower_keeps_its_seeded_random_init(run):
    import torch
    from transformers import set_seed

    from tinyllava_edge.model import TinyLlavaForConditionalGeneration
    from tinyllava_edge.train import TrainConfig
    from tinyllava_edge.train.run import load_start

    out, _, _ = run
    set_seed(0)
    fresh, _, _ = load_start(TrainConfig(preset="tiny-shapes", tokenizer=str(out / "tokenizer"), data="unused.json",
                                         output="unused"))
    trained = TinyLlavaForConditionalGeneration.from_pretrained(out / "model")
    tower = dict(trained.vision_tower.named_parameters())
    assert all(torch.equal(p, tower[n]) for n, p in fresh.vision_tower.named_parameters())
    connector = dict(trained.connector.named_parameters())
    assert not any(torch.equal(p, connector[n]) for n, p in fresh.connector.named_parameters())


def test_the_preset_scales_the_towers_position_embeddings_at_init(run):
    """tiny-shapes: position embeddings x16 on top of the family's init, nothing else touched."""
    import torch
    from transformers import set_seed

    from tinyllava_edge.model import TinyLlavaForConditionalGeneration
    from tinyllava_edge.model.presets import get_preset
    from tinyllava_edge.train import TrainConfig
    from tinyllava_edge.train.run import load_start

    out, _, _ = run
    preset = get_preset("tiny-shapes")
    assert preset.vision_position_scale == 16.0 and preset.vision_feature_layer == 0
    set_seed(0)
    scaled, tokenizer, _ = load_start(TrainConfig(preset="tiny-shapes", tokenizer=str(out / "tokenizer"),
                                                  data="unused.json", output="unused"))
    set_seed(0)
    plain = TinyLlavaForConditionalGeneration(preset.config(vocab_size=len(tokenizer), pad_token=tokenizer.pad_token,
                                                            pad_token_id=tokenizer.pad_token_id))
    mine, theirs = dict(scaled.named_parameters()), dict(plain.named_parameters())
    moved = [n for n in mine if not torch.equal(mine[n], theirs[n])]
    assert moved == ["vision_tower._vision_tower.vision_model.embeddings.position_embedding.weight"], moved
    torch.testing.assert_close(mine[moved[0]], 16.0 * theirs[moved[0]])


def test_a_non_empty_output_is_refused_and_overwrite_needs_a_previous_run(run, tmp_path):
    out, _, _ = run
    with pytest.raises(TinyLlavaError, match="is not empty"):
        train_preset("tiny-shapes", out, quiet=True, log=lambda _: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(TinyLlavaError, match="holds no preset run"):
        train_preset("tiny-shapes", other, overwrite=True, quiet=True, log=lambda _: None)
    assert (other / "keep.txt").is_file()
    with pytest.raises(TinyLlavaError, match="not a known preset recipe|known"):
        train_preset("no-such", tmp_path / "x", log=lambda _: None)


def test_cli_runs_the_recipe_without_data_and_refuses_a_stage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinyllava_edge.cli.train", "--preset", "tiny-shapes",
                           "--output", str(tmp_path / "o"), "--stage", "pretrain"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --stage does not apply")
    help_text = subprocess.run([sys.executable, "-m", "tinyllava_edge.cli.train", "--help"],
                               capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    assert "tinyllava-train --preset tiny-shapes --output" in help_text


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, except the records of when and where a run was
    made (wall times, the output path in the run's arguments)."""
    made = {"train_summary.json", "train_config.json", "training_args.bin", "trainer_state.json", SUMMARY_FILE}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in made}


def test_the_same_seed_on_the_same_machine_gives_the_same_model_byte_for_byte(run, tmp_path):
    """The determinism the README promises: data, tokenizer and both checkpoints are reproduced exactly."""
    out, _, _ = run
    again = tmp_path / "again"
    train_preset("tiny-shapes", again, quiet=True, log=lambda _: None, dataset_overrides=SMALL_DATA,
                 max_steps=2, batch_size=4, evaluate=False)
    for part in ("data", "tokenizer", "pretrain", "model"):
        first, second = _files(out / part), _files(again / part)
        assert first.keys() == second.keys(), part
        differ = [name for name in first if first[name] != second[name]]
        assert not differ, f"{part}: {differ}"
    assert "model.safetensors" in _files(out / "model") and "meta.json" in _files(out / "data")


def test_a_run_is_placed_against_the_recipes_reference_runs():
    from tinyllava_edge.train.preset_recipes import Reference

    ref = Reference(seeds=(0, 1, 2), accuracies=(96.0, 94.0, 95.5), cpu="Some CPU")
    assert ref.mean == pytest.approx(95.1667, abs=1e-3) and ref.worst == 94.0
    assert "BELOW every one" in ref.verdict(91.5) and "worst 94.0 %, mean 95.2 %" in ref.verdict(91.5)
    assert "within the spread" in ref.verdict(94.5)
    assert "at or above the mean" in ref.verdict(95.2) and "Some CPU" in ref.verdict(95.2)


def test_only_a_full_evaluated_default_run_gets_the_reference_sentence(run):
    from tinyllava_edge.train.preset_recipes import is_current_run, recipe_fingerprint, reference_verdict

    recipe = PRESET_RECIPES.get("tiny-shapes")
    assert recipe.reference is not None and len(recipe.reference.seeds) >= 3
    _, small, _ = run
    assert reference_verdict(small) is None  # made small: not comparable
    assert is_current_run(json.loads(json.dumps(small)))  # written by this recipe, read back from JSON
    full = {"preset": "tiny-shapes", "dataset": dict(recipe.dataset), "overrides": {},
            "recipe_version": json.loads(json.dumps(recipe_fingerprint("tiny-shapes"))),
            "eval": {"split": "test", "exact_match": recipe.reference.worst - 5}}
    assert "BELOW every one" in reference_verdict(full)
    assert reference_verdict({**full, "eval": {**full["eval"], "split": "val"}}) is None
    # an earlier recipe's run (another generator, other steps, or no record at all) is not compared
    older = {**full["recipe_version"], "generator_version": full["recipe_version"]["generator_version"] - 1}
    assert reference_verdict({**full, "recipe_version": older}) is None
    steps = json.loads(json.dumps(full["recipe_version"]))
    steps["stages"][0]["max_steps"] += 1
    assert reference_verdict({**full, "recipe_version": steps}) is None
    assert reference_verdict({k: v for k, v in full.items() if k != "recipe_version"}) is None


def test_the_main_job_prints_the_reference_sentence(capsys, monkeypatch):
    from tinyllava_edge.cli.pipeline import print_summary
    from tinyllava_edge.train.preset_recipes import recipe_fingerprint

    recipe = PRESET_RECIPES.get("tiny-shapes")
    summary = {"stages": [], "runs": {"16-bit": {"threads": 2}}, "questions": [],
               "recipe": {"preset": "tiny-shapes", "dataset": dict(recipe.dataset), "overrides": {},
                          "recipe_version": recipe_fingerprint("tiny-shapes"), "train_wall_seconds": 500.0,
                          "stages": {"pretrain": {"parameters": {"total": 9_787_136}}},
                          "eval": {"split": "test", "n": 4554, "exact_match": 50.0, "per_kind": {"shape": 50.0}}}}
    import tinyllava_edge.cli.pipeline as pipeline

    monkeypatch.setattr(pipeline, "comparison_lines", lambda runs, questions: [])
    print_summary(summary)
    out = capsys.readouterr().out
    assert "this run scored 50.0 %, BELOW every one of the recipe's reference runs" in out
