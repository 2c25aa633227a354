from pathlib import Path

import pytest

from lmscale.config import ConfigError, from_dict, grad_accum_steps, load_config
from lmscale.tasks import task_of
from lmscale.train.plan import plan_run

from .conftest import REPO, run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_layer(tmp_path: Path) -> None:
    path = write(tmp_path, "run: {name: x}\ndata: {path: d}\noptim: {lr: 3e-4}\n")
    cfg = load_config(path, ["trainer.max_steps=7", "optim.lr=1e-3", "logging.wandb.tags=[a, b]"])
    assert cfg.run.name == "x" and cfg.run.path == Path("runs/x")
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.trainer.max_steps == 7 and cfg.total_steps == 7
    assert cfg.logging.wandb.tags == ["a", "b"]
    assert load_config(path).optim.lr == pytest.approx(3e-4)  # YAML 1.1 would read "3e-4" as a string


@pytest.mark.parametrize(
    ("text", "override", "message"),
    [
        ("data: {path: d}\nmodel: {d_modle: 3}\n", None, "model.d_modle: unknown key"),
        ("data: {path: d}\ntrainer: {max_steps: ten}\n", None, "trainer.max_steps: expected int, got 'ten'"),
        ("data: {path: d}\nzero: {stage: 4}\n", None, "zero.stage: expected one of 1 | 2 | 3, got 4"),
        ("data: {path: d}\n", "data.lanes=0", "data.lanes: must be > 0"),
        ("data: {path: d}\n", "model.norm_eps=0", "model.norm_eps: must be > 0"),
        ("data: {path: d}\n", "trainer.max_rollbacks=-1", "trainer.max_rollbacks: must be >= 0"),
        ("data: {path: d}\n", "trainer.max_steps=1.5", "trainer.max_steps: expected int"),
        ("data: {path: d}\n", "optim.lr=-1", "optim.lr: must be > 0"),
        ("model: {}\n", None, "data.path: missing"),
        ("data: {path: d}\nmodel: {d_model: 100, n_heads: 3}\n", None, "model.d_model: 100 is not divisible"),
        ("data: {path: d}\n", "schedule.total_steps=5", "schedule.total_steps: 5 is shorter"),
        ("data: {path: d}\nzero: {stage: 2, offload_params: cpu}\n", None, "zero.offload_params"),
        ("data: {path: d}\n", "trainer", "--set trainer: expected key=value"),
        ("data: {path: d}\n", "trainer.activation_checkpointing=0", "trainer.activation_checkpointing: must be > 0"),
        ("data: {path: d}\n", "trainer.activation_checkpointing=half", "trainer.activation_checkpointing: expected"),
        ("data: {path: d}\nzero: {stage: 3}\n", "trainer.compile=true", "trainer.compile: not with zero.stage 3"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, override: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        load_config(write(tmp_path, text), [override] if override else [])


def test_world_size_must_divide_global_batch(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data: {path: d}\ntrainer: {micro_batch_size: 4, global_batch_size: 24}\n"))
    assert grad_accum_steps(cfg, 2) == 3
    with pytest.raises(ConfigError, match="global_batch_size: 24 is not divisible by micro_batch_size"):
        grad_accum_steps(cfg, 4)


def test_missing_data_dir_is_reported(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, f"data: {{path: {tmp_path / 'nope'}}}\n"))
    with pytest.raises(ConfigError, match="nope: dataset directory does not exist"):
        plan_run(cfg, 1)


def test_seq_len_larger_than_model_positions(tmp_path: Path, dataset: Path) -> None:
    cfg = load_config(write(tmp_path, f"data: {{path: {dataset}}}\nmodel: {{seq_len: 32}}\n"))
    with pytest.raises(ConfigError, match=r"data's seq_len 64 .* larger than the model's 32 positions"):
        plan_run(cfg, 1)
    plan = plan_run(load_config(write(tmp_path, f"data: {{path: {dataset}}}\n")), 2)
    assert plan.cfg.model.seq_len == 64 and plan.cfg.model.vocab_size == 512


# Fine-tuning configs tune a pretrained model: the fine-tuning tests run them (tests/test_bert_train.py,
# tests/test_t5_finetune.py, tests/test_rnn_finetune.py).
PRETRAINING_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if "\nfinetune:" not in p.read_text())


@pytest.mark.parametrize("config", PRETRAINING_CONFIGS)
def test_every_shipped_config_dry_runs(
    config: str, dataset: Path, mlm_dataset: Path, t5_dataset: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``lmscale train --dry-run`` in this process: a process of its own would import torch again for each
    config (tests/test_cli_e2e.py runs the command itself)."""
    from launcher.cli import build_parser
    from launcher.train import train

    trains_on = task_of(load_config(REPO / "configs" / config).model).name
    data = {"mlm": mlm_dataset, "span_corruption": t5_dataset}.get(trains_on, dataset)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    code = train(build_parser().parse_args(["train", f"configs/{config}", "--dry-run", "--nproc", "2", "--set",
                                            f"data.path={data}"]))  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "train_micro_batch_size_per_gpu" in printed.out and "zero_optimization" in printed.out
    assert "# estimated peak memory per cpu rank:" in printed.out and "activations" in printed.out


def test_cli_config_error_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {path: d}\nmodel: {d_modle: 3}\n")
    result = run_cli("train", str(path), "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("lmscale: error: model.d_modle: unknown key")
    assert "Traceback" not in result.stderr


def test_the_finetune_section_loads_under_its_earlier_name_task() -> None:
    """Configs and checkpoints written before the rename keep loading; both names at once are refused."""
    data = {"path": "data/demo"}
    cfg = from_dict({"data": data, "finetune": None, "task": {"train": "train.csv"}})
    assert cfg.finetune is not None and cfg.finetune.train == "train.csv"
    assert from_dict({"data": data, "task": None}).finetune is None  # what every earlier checkpoint's config holds
    with pytest.raises(ConfigError, match=r"^task: the earlier name of finetune; give one of them$"):
        from_dict({"data": data, "finetune": {"train": "a.csv"}, "task": {"train": "b.csv"}})
