"""Multiple-choice evaluation (``lmscale eval --task``) against lm-evaluation-harness on the same export."""

from __future__ import annotations

import inspect
import json
import random
import re
import textwrap
from pathlib import Path

import pytest

from lmscale.choices import read_task, request_tokens, score_task
from lmscale.data.tokenizer import end_token_id, load_tokenizer
from lmscale.errors import UsageError
from lmscale.hf.directory import load_hf_model

from .conftest import error_lines, metrics_records, run_here
from .distributed import train_in_process

pytestmark = pytest.mark.slow

MODULES = ("textwrap", "json", "shutil", "inspect", "random", "string", "glob", "fnmatch", "difflib", "base64")


def docstring_task(path: Path, examples: int = 60) -> None:
    """A docstring's first line as the context, its function's name among four of the same module's."""
    rng = random.Random(0)
    rows = []
    for name in MODULES:
        module = __import__(name)
        functions = sorted(n for n, f in vars(module).items()
                           if inspect.isfunction(f) and not n.startswith("_") and inspect.getdoc(f))  # fmt: skip
        for function in functions:
            others = rng.sample([n for n in functions if n != function], 3) if len(functions) > 3 else []
            if not others:
                continue
            choices = [function, *others]
            rng.shuffle(choices)
            summary = inspect.getdoc(getattr(module, function)).splitlines()[0]  # type: ignore[union-attr]
            rows.append({"context": f"{summary}\n{name}.", "choices": choices, "label": choices.index(function)})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:examples]))


def harness_scores(export: Path, task_file: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list]:
    """acc, acc_norm and every choice's log-likelihood as lm-evaluation-harness computes them."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "lmscale_choices.yaml").write_text(textwrap.dedent(f"""\
        task: lmscale_choices
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {task_file}
        test_split: test
        output_type: multiple_choice
        doc_to_text: context
        doc_to_choice: choices
        doc_to_target: label
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))  # fmt: skip
    model = HFLM(pretrained=str(export), device="cpu", batch_size=8)
    out = simple_evaluate(model=model, tasks=["lmscale_choices"], task_manager=TaskManager(include_path=str(tasks)),
                          log_samples=True)  # fmt: skip
    assert out is not None
    samples = sorted(out["samples"]["lmscale_choices"], key=lambda s: s["doc_id"])
    lls = [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]
    return out["results"]["lmscale_choices"], lls


def test_multiple_choice_scores_are_lm_evaluation_harness_scores(
    two_rank_reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same task file and model: lmscale's acc, acc_norm and every choice's log-likelihood are
    lm-evaluation-harness's (its Hugging Face model on the export, a local task of dataset_path json)."""
    task_file = tmp_path / "docstrings.jsonl"
    docstring_task(task_file)
    export = tmp_path / "export"
    exported = run_here("export", str(two_rank_reference), "--output", str(export))
    assert exported.returncode == 0, exported.stderr[-3000:]

    from_export = run_here("eval", str(export), "--task", str(task_file))
    assert from_export.returncode == 0, from_export.stderr[-3000:]
    printed = re.fullmatch(r"acc (\S+)  acc_norm (\S+)  \(60 examples, 4 choices\)\n", from_export.stdout)
    assert printed is not None, from_export.stdout

    model = load_hf_model(export)[0].eval()
    tok = load_tokenizer(export / "tokenizer.json")
    ours = score_task(model, tok, read_task(task_file), end_token_id(tok), batch_size=7)
    theirs, their_lls = harness_scores(export, task_file, tmp_path, monkeypatch)
    assert ours.acc == pytest.approx(theirs["acc,none"]) and ours.acc_norm == pytest.approx(theirs["acc_norm,none"])
    assert [len(row) for row in ours.loglikelihoods] == [len(row) for row in their_lls]
    flat = [x for row in ours.loglikelihoods for x in row]
    assert flat == pytest.approx([x for row in their_lls for x in row], abs=1e-3)
    assert float(printed.group(1)) == pytest.approx(ours.acc, abs=5e-5)
    assert float(printed.group(2)) == pytest.approx(ours.acc_norm, abs=5e-5)
    # The two scores differ somewhere: the task tells the normalisation apart, and chance is not the answer.
    assert len({round(x, 4) for x in flat}) > 200


def test_a_context_ending_in_a_space_gives_the_space_to_the_choice(two_rank_reference: Path) -> None:
    tok = load_tokenizer(two_rank_reference / "tokenizer.json")
    moved, n = request_tokens(tok, "The answer is ", "yes", 0)
    given, m = request_tokens(tok, "The answer is", " yes", 0)  # the space already moved to the choice
    assert (moved, n) == (given, m)


def test_a_bad_task_file_fails_in_one_line(two_rank_reference: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"context": "a", "choices": ["x", "y"], "label": 0}\n{"context": "b", "choices": ["x"], "label": 0}\n'
    )
    with pytest.raises(UsageError, match=r"bad.jsonl:2: 'choices' must be a list of at least two strings"):
        read_task(bad)
    result = run_here("eval", str(two_rank_reference), "--task", str(bad))
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"lmscale: error: {bad}:2: 'choices' must be a list of at least two strings"]


def test_downstream_tasks_score_on_every_rank_during_training_as_eval_scores_the_checkpoint(
    dataset: Path, tmp_path: Path
) -> None:
    """trainer.downstream under ZeRO-3 on 2 ranks, with an odd number of requests (one rank scores one more,
    the other a repeat): scored at steps 3 and 6, and what is logged at step 6 is what ``lmscale eval --task``
    gives that step's checkpoint; the report lists and plots it."""
    task_file = tmp_path / "docstrings.jsonl"
    docstring_task(task_file, examples=40)
    with task_file.open("a") as f:
        f.write(json.dumps({"context": "Return the absolute value.\nbuiltins.", "choices": ["abs", "max", "len"],
                            "label": 0}) + "\n")  # fmt: skip
    run_dir = tmp_path / "run"
    task = f"[{{name: docs, path: {task_file}, every_steps: 3}}]"
    train_in_process(dataset, run_dir, 2, "zero.stage=3", "trainer.max_steps=6", f"trainer.downstream={task}")
    logged = {r["step"]: r for r in metrics_records(run_dir) if "downstream/docs/acc" in r}
    assert sorted(logged) == [3, 6]
    scored = run_here("eval", str(run_dir), "--task", str(task_file))  # the latest checkpoint: step 6
    assert scored.returncode == 0, scored.stderr[-2000:]
    printed = re.fullmatch(r"acc (\S+)  acc_norm (\S+)  \(41 examples, 3/4 choices\)\n", scored.stdout)
    assert printed is not None, scored.stdout
    assert float(printed.group(1)) == pytest.approx(logged[6]["downstream/docs/acc"], abs=5e-5)
    assert float(printed.group(2)) == pytest.approx(logged[6]["downstream/docs/acc_norm"], abs=5e-5)
    report = run_here("report", str(run_dir), "--output", str(tmp_path / "report.png"))
    assert report.returncode == 0, report.stderr[-2000:]
    acc, norm = logged[6]["downstream/docs/acc"], logged[6]["downstream/docs/acc_norm"]
    assert re.search(rf"docs acc / acc_norm +{acc:.4f} / {norm:.4f} \(step 6\)", report.stdout), report.stdout
    from PIL import Image

    assert Image.open(tmp_path / "report.png").size == (1100, 1050)  # a row of downstream panels
