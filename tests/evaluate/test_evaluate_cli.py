"""`megaloom evaluate` on bad input (one line, exit status 2), `--skip-bad`, and tensor
parallelism (`--nproc 2` gives the numbers of one process)."""

import json

import pytest
from eval_helpers import (
    choice_records,
    classify_records,
    documents,
    generate_records,
    lambada_records,
    megaloom,
    write_jsonl,
)

from megaloom.cli import main

LONG = " ".join(["the fox walks to the long road."] * 30)
BAD_INPUT = [  # (task, file name, file content, extra flags, expected words in the error)
    ("perplexity", "empty.jsonl", "", [], "no records"),
    ("perplexity", "nofield.jsonl", '{"body": "x y z"}\n', [], "missing field 'text'"),
    ("perplexity", "short.jsonl", '{"text": "a"}\n', [], "shorter than two tokens"),
    ("perplexity", "docs.jsonl", None, ["--max-length", "8", "--stride", "9"], "--stride"),
    ("perplexity", "docs.jsonl", None, ["--max-length", "500"], "--max-length"),
    ("perplexity", "tiny.jsonl", '{"text": "the fox walks."}\n',
     ["--protocol", "chunks", "--max-length", "65"], "fewer than one"),
    ("perplexity", "broken.jsonl", '{"text": "a b c"\n', [], "invalid JSON"),
    ("perplexity", "missing.jsonl", False, [], "not found"),
    ("lambada", "oneword.jsonl", '{"text": "road"}\n', [], "last word"),
    ("lambada", "long.jsonl", json.dumps({"text": LONG}) + "\n", [], "--truncate"),
    ("choice", "one.jsonl", '{"context": "a fox", "choices": ["x"], "label": 0}\n', [],
     "at least two"),
    ("choice", "range.jsonl", '{"context": "a fox", "choices": ["x", "y"], "label": 2}\n', [],
     "out of range"),
    ("choice", "text.txt", "the fox\n", [], "JSONL"),
    ("generate", "gen.jsonl", None, ["--max-tokens", "64"], "no room"),
    ("generate", "gen.jsonl", None, ["--top-p", "2"], "top_p"),
    ("classify", "cls.jsonl", '{"text": "a fox", "label": "angry"}\n', [], "not one of"),
]


@pytest.mark.parametrize("task,name,content,flags,expected", BAD_INPUT,
                         ids=[f"{c[0]}-{c[1]}-{c[4]}" for c in BAD_INPUT])
def test_bad_input_is_one_line(tmp_path, models, capfd, task, name, content, flags, expected):
    path = tmp_path / name
    if content is None:
        records = generate_records() if task == "generate" else documents()
        write_jsonl(path, records)
    elif content is not False:
        path.write_text(content)
    model = models.classifier if task == "classify" else models.lm
    capfd.readouterr()
    code = main(["evaluate", str(model), "--task", task, "--data", str(path), *flags])
    errors = [line for line in capfd.readouterr().err.splitlines()
              if line.startswith("megaloom evaluate: error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors


MISUSE = [  # (model, task, flags, expected words in the error)
    ("classifier", "choice", [], "needs a language model"),
    ("classifier", "classify", ["--label-words", "a=b,c=d"], "predicts with its head"),
    ("lm", "classify", ["--prompt", "Text:"], "{text}"),
    ("lm", "classify", ["--label-words", "positive"], "label=word"),
    ("lm", "classify", ["--label-words", "a=x,a=y"], "twice"),
    ("lm", "classify", ["--label-words", "negative=bad,positive=good"], "not one of"),
]


@pytest.mark.parametrize("model,task,flags,expected", MISUSE, ids=[m[3] for m in MISUSE])
def test_model_and_flags_must_suit_the_task(tmp_path, models, capfd, model, task, flags,
                                            expected):
    data = write_jsonl(tmp_path / "cls.jsonl", classify_records())
    capfd.readouterr()
    assert main(["evaluate", str(getattr(models, model)), "--task", task, "--data", str(data),
                 *flags]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors


def test_skip_bad_counts_and_reports(tmp_path, models):
    good = choice_records(3)
    lines = [json.dumps(good[0]), '{"context": "a", "choices": ["x"], "label": 0}',
             "not json", json.dumps(good[1]), '{"context": "a", "choices": ["x", "y"]}',
             json.dumps(good[2])]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out, clean = tmp_path / "mixed.json", tmp_path / "clean.json"
    assert main(["evaluate", str(models.lm), "--task", "choice", "--data", str(data),
                 "--skip-bad", "--json", str(out)]) == 0
    assert main(["evaluate", str(models.lm), "--task", "choice", "--data",
                 str(write_jsonl(tmp_path / "clean.jsonl", good)), "--json", str(clean)]) == 0
    report, reference = json.loads(out.read_text()), json.loads(clean.read_text())
    assert report["skipped"] == 3 and report["documents"] == 3
    assert sorted(s.split(": ")[0][-1] for s in report["skipped_lines"]) == ["2", "3", "5"]
    assert report["samples"] == reference["samples"]


def test_tensor_parallel_equals_one_process(tmp_path, models):
    runs = {
        "perplexity": (models.lm, write_jsonl(tmp_path / "docs.jsonl", documents())),
        "lambada": (models.lm, write_jsonl(tmp_path / "cloze.jsonl", lambada_records())),
        "classify": (models.classifier, write_jsonl(tmp_path / "cls.jsonl",
                                                    classify_records())),
    }
    for task, (model, data) in runs.items():
        reports = []
        for nproc in (1, 2):
            out = tmp_path / f"{task}-{nproc}.json"
            result = megaloom("evaluate", model, "--task", task, "--data", data, "--json", out,
                              "--nproc", nproc, "--batch-size", 3)
            assert result.returncode == 0, result.stderr[-2000:]
            reports.append(json.loads(out.read_text()))
        one, two = reports
        if task == "classify":
            assert one["predictions"] == two["predictions"]
            assert one["accuracy"] == two["accuracy"]
        else:
            assert two["tokens_scored"] == one["tokens_scored"]
            assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
