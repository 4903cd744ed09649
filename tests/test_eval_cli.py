"""``tinyllava-eval`` end to end on a miniature checkpoint, and TorchPredictor's batching."""

import json

import pytest

from tinyllava_edge.cli.eval import main
from tinyllava_edge.eval.metrics import exact_match_text

MINIATURE = "TinyLLaVA-TinyLlama-SigLIP"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from tinyllava_edge.data.shapes import write_dataset
    from tinyllava_edge.testing.checkpoints import build_miniature

    root = tmp_path_factory.mktemp("eval_cli")
    build_miniature(MINIATURE, root / "model")
    write_dataset(root / "data", n_train=2, n_val=2, n_test=6, image_size=32)
    return root


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in ("shapes", "vqav2", "gqa", "textvqa", "scienceqa", "pope", "mme", "mmvet"):
        assert name in text
    assert "--skip-bad" in text and "--score-only" in text


def test_shapes_end_to_end(workdir, capsys):
    out = workdir / "out"
    code = main(["--benchmark", "shapes", "--model", str(workdir / "model"), "--data", str(workdir / "data"),
                 "--out", str(out), "--batch-size", "4", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "answers.jsonl" in printed

    records = {r["id"]: r for r in json.loads((workdir / "data" / "test.json").read_text())}
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == sorted(records)
    assert all(a["model_id"] == "model" and a["metadata"]["kind"] == records[a["question_id"]]["kind"]
               for a in answers)
    # exact match recomputed from the files, for whatever the random weights answered
    right = [exact_match_text(a["text"]) == records[a["question_id"]]["conversations"][1]["value"] for a in answers]
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["n"] == len(records) and metrics["correct"] == sum(right)
    assert metrics["exact_match"] == pytest.approx(100 * sum(right) / len(right))
    assert sum(k["n"] for k in metrics["per_kind"].values()) == len(records)
    wrong = len(right) - sum(right)
    assert sum(c["count"] for c in metrics["confusions"]) == wrong or len(metrics["confusions"]) == 10
    assert results["settings"]["max_new_tokens"] == 8 and results["settings"]["template"] == "llama"
    assert results["skipped"]["count"] == 0
    markdown = (out / "results.md").read_text()
    assert "| kind | questions | correct | exact match |" in markdown

    # --score-only reads the same answers back and gives the same numbers
    code = main(["--benchmark", "shapes", "--score-only", "--answers", str(out / "answers.jsonl"),
                 "--data", str(workdir / "data"), "--out", str(workdir / "rescored")])
    assert code == 0
    assert json.loads((workdir / "rescored" / "results.json").read_text())["metrics"] == metrics


def test_limit_and_skip_bad(workdir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    records = json.loads((workdir / "data" / "test.json").read_text())[:5]
    for r in records:
        r["image"] = str((workdir / "data" / r["image"]).resolve())
    records[1]["image"] = str(tmp_path / "gone.png")
    (data / "test.json").write_text(json.dumps(records))
    common = ["--benchmark", "shapes", "--model", str(workdir / "model"), "--data", str(data), "--quiet",
              "--out", str(tmp_path / "out")]
    assert main(common) == 2
    assert main([*common, "--skip-bad", "--limit", "4"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["skipped"]["count"] == 1 and results["counts"]["answers"] == 3
    assert "record 1" in results["skipped"]["records"][0]


@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "shapes", "--data", "{data}"], "--model is needed"),
    (["--benchmark", "shapes", "--model", "{model}", "--data", "{root}/nowhere"], "does not exist"),
    (["--benchmark", "gqa", "--model", "{model}", "--data", "{data}"], "--data is for the shapes benchmark"),
    (["--benchmark", "shapes", "--score-only", "--data", "{data}"], "--score-only needs --answers"),
    (["--benchmark", "pope", "--model", "{model}"], "needs --questions"),
    (["--benchmark", "shapes", "--model", "{root}/data", "--data", "{data}"], "config.json"),
])
def test_user_errors_are_one_line(workdir, capsys, argv, message):
    fill = {"data": workdir / "data", "model": workdir / "model", "root": workdir}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_record_error_suggests_skip_bad(workdir, tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "image": "x.jpg", "text": "Is there a dog?", "label": "yes"}\n'
                                      "not json\n")
    code = main(["--benchmark", "pope", "--score-only", "--answers", str(tmp_path / "q.jsonl"),
                 "--questions", str(tmp_path / "q.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "q.jsonl, line 2: is not valid JSON" in err and "--skip-bad" in err


def test_batched_answers_equal_one_at_a_time(workdir):
    """Left padding in a batch (and a text-only row among image rows) changes no greedy answer."""
    from tinyllava_edge.eval import Request, TorchPredictor

    records = json.loads((workdir / "data" / "test.json").read_text())[:5]
    requests = [Request(str(workdir / "data" / r["image"]), r["conversations"][0]["value"].replace("<image>\n", ""))
                for r in records]
    requests.insert(2, Request(None, "How many objects are there?"))
    one = TorchPredictor(workdir / "model", batch_size=1, max_new_tokens=4).predict(requests)
    many = TorchPredictor(workdir / "model", batch_size=6, max_new_tokens=4).predict(requests)
    assert one == many and len(one) == len(requests)
