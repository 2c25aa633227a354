"""The typed schema of a training run.

Defaults in code < YAML file < ``--set a.b=c`` overrides. Every section is a dataclass; loading walks the
dataclass fields, so an unknown key, a wrong type or a bad value is an error that names the dotted field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmscale.errors import UsageError
from lmscale.families import FAMILIES
from lmscale.models import ModelConfig
from lmscale.models.gpt import GPTConfig
from lmscale.tasks import task_of


class ConfigError(UsageError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass
class RunConfig:
    name: str = "run"
    """Name of the run; the run directory defaults to runs/<name>."""
    dir: str | None = None
    """Run directory (config, checkpoints, metrics); default runs/<name>."""
    seed: int = 1234
    """Seed for weight init, data order and dropout."""

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name


@dataclass
class DataSourceConfig:
    path: str
    """A directory written by `lmscale prepare` (holds manifest.json)."""
    weight: float = 1.0
    """Relative share of this dataset in the training stream."""


@dataclass
class DataConfig:
    path: str | None = None
    """A prepared dataset directory; shorthand for a single entry in `sources`."""
    sources: list[DataSourceConfig] = field(default_factory=list)
    """Several prepared datasets mixed by weight."""
    num_workers: int = 1
    """DataLoader worker processes per rank; the sample order does not depend on it."""
    shuffle: bool = True
    """Seeded shuffle of shard order and of samples within a shard, new every epoch."""
    lanes: int = 16
    """Contiguous parts of each epoch read side by side: a micro-batch comes from one lane, a rank reads only
    its lanes' shards (1/world of them when world_size * num_workers divides lanes), and each loader
    worker holds one shard per lane it reads in memory. Part of the sample order: keep it for the run's life."""
    strict: bool = False
    """Fail on a corrupt shard instead of skipping it with a counted warning."""
    cache_dir: str | None = None
    """A local directory that keeps the shards of remote datasets (s3://, https://) once read, so that later
    epochs and restarts read them from disk; one per node, shared by its ranks (lmscale.data.shard_cache)."""
    cache_limit_gb: float = 100.0
    """The most the cache holds; the least recently read shards go first."""
    log_sample_keys: bool = False
    """Write the sample keys of every step to <run>/sample_keys/rank_<r>.jsonl (data provenance)."""
    mlm_probability: float = 0.15
    """Masked-LM training: share of (non-special) tokens masked, re-drawn every time a sample is served
    (BERT 0.15; MosaicBERT and ModernBERT train with 0.30)."""
    mlm_eval_probability: float = 0.15
    """Masked-LM validation: share masked, the same masks at every evaluation."""

    def resolved_sources(self) -> list[DataSourceConfig]:
        if self.path is not None and self.sources:
            raise ConfigError("data: give either data.path or data.sources, not both")
        if self.path is not None:
            return [DataSourceConfig(path=self.path)]
        if not self.sources:
            raise ConfigError("data.path: missing (a directory written by `lmscale prepare`)")
        return self.sources


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not biases, norms)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    """Linear warmup from 0 to optim.lr over this many optimizer steps."""
    total_steps: int | None = None
    """Length of the cosine schedule; default trainer.max_steps."""
    min_lr_ratio: float = 0.1
    """The cosine decays to optim.lr * min_lr_ratio."""


@dataclass
class ZeroConfig:
    stage: Literal[1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    """Parameter offload (stage 3 only)."""


@dataclass
class DownstreamTask:
    """A multiple-choice task scored during training (``lmscale eval --task``'s JSONL): acc and acc_norm logged
    as ``downstream/<name>/acc`` and ``downstream/<name>/acc_norm``."""

    name: str
    path: str
    every_steps: int = 500


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimizer steps to train for (a resumed run continues to this step)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum_steps: int | None = None
    """Micro-batches per optimizer step; derived from global_batch_size when that is given, else 1."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; must equal micro_batch_size * grad_accum_steps * world."""
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: Literal["none", "full"] | int = "none"
    """Recompute blocks' activations in the backward pass instead of keeping them: none, full (every block),
    or N (every N-th block, from the first). Costs one more forward of those blocks; losses are unchanged."""
    compile: bool = False
    """Compile each block with torch.compile before the engine is built (the time it takes is in the start
    event). Losses match the eager run up to floating-point reassociation; checkpoints are interchangeable."""
    eval_every_steps: int = 100
    """Validation loss every N steps (0 disables)."""
    eval_batches: int = 10
    """Micro-batches per rank in one validation pass."""
    max_rollbacks: int = 3
    """A step whose loss or gradient norm is not finite rolls the weights back to the last checkpoint and
    skips the batches since; after this many rollbacks in one job (or with no checkpoint) the run stops."""
    collective_timeout_minutes: float = 10.0
    """How long a rank waits in one collective (all-reduce, barrier, rendezvous) during start-up, the first
    step, checkpoint saves and loads before it fails: a dead or hung peer surfaces after this long instead of
    NCCL's 10-30 minutes. Must cover the slowest save, during which the other ranks wait at a barrier."""
    spike_sigma: float | None = None
    """Skip an optimizer step whose loss or gradient norm is more than this many standard deviations above the
    last spike_window kept steps (weights and optimizer state untouched; counted and logged). None: off."""
    spike_window: int = 128
    """Steps of history the spike test compares against."""
    step_timeout_minutes: float = 5.0
    """The same bound once the first step is done, outside saves and loads: must cover the slowest step,
    evaluation pass and data-loader stall. A hung peer stops the job after this long."""
    downstream: list[DownstreamTask] = field(default_factory=list)
    """Multiple-choice tasks scored on every rank every ``every_steps`` (a causal LM's)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save a checkpoint every N steps (0 disables periodic saves); a final one is always saved."""
    keep_last: int = 3
    """Checkpoints kept in the run directory; older ones are deleted after a successful save."""
    keep_every_steps: int = 0
    """Also keep every checkpoint whose step is a multiple of this (milestones; 0: none)."""


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    """online needs an API key; without one lmscale falls back to offline."""
    project: str = "lmscale"
    entity: str | None = None
    name: str | None = None
    """Display name; default run.name."""
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every_steps: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; default: a table of known GPUs, or measured on CPU."""
    tensorboard: bool = False
    """Also write the metrics and events as TensorBoard scalars in RUN_DIR/tensorboard (needs tensorboard)."""


@dataclass
class FinetuneConfig:
    """Fine-tuning (``lmscale finetune``) from examples in CSV or JSONL: labelled texts for a classifier (BERT),
    source/target pairs for an encoder-decoder (T5). The pretrained model's family says which."""

    train: str | None = None
    """Training examples: a .csv (with a header) or .jsonl file, one example per row."""
    validation: str | None = None
    """Validation examples, scored every trainer.eval_every_steps (a classifier's accuracy and macro-F1, an
    encoder-decoder's BLEU and chrF); the best checkpoint by validation accuracy or BLEU is kept."""
    text_field: str = "text"
    text_pair_field: str = "text_pair"
    """A second text (sentence pairs), used when every row has it."""
    label_field: str = "label"
    """Class of the example: a string or an integer, kept as the class name."""
    source_field: str = "source"
    """Sequence to sequence: the input text of a pair."""
    target_field: str = "target"
    """Sequence to sequence: the output text the model learns to write."""
    max_length: int | None = None
    """Tokens per example (a classifier's, [CLS] and [SEP] included, longer ones truncated; an encoder-decoder's
    source with end of sequence, a longer one refused). Default: model.seq_len."""
    max_target_length: int | None = None
    """Sequence to sequence: tokens of a target with end of sequence (a longer one is refused), and of the
    outputs validation generates. Default: max_length."""
    num_beams: int = 1
    """Sequence to sequence: validation decodes greedily (1) or by beam search with this many beams."""
    bleu_tokenize: str = "13a"
    """sacrebleu's tokenisation for val_bleu: ``13a`` (its default, for European languages), ``zh``,
    ``ja-mecab``, ``intl``, ``char`` ..."""
    bleu_signature: str | None = None
    """Filled in by ``lmscale finetune``: sacrebleu's signature of val_bleu (version, tokenisation, smoothing),
    what makes a BLEU comparable with another."""
    chrf_signature: str | None = None
    """Filled in by ``lmscale finetune``: sacrebleu's signature of val_chrf."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=GPTConfig)
    """One family's section, chosen by its ``family`` key (gpt by default): lmscale.families."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig | None = None
    """Fine-tuning only: the labelled data; ``lmscale finetune`` turns it into the run's data.path."""

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps or self.trainer.max_steps

    @property
    def predicted_fraction(self) -> float:
        """Share of positions the output head predicts: the masked ones of a masked LM, all of a causal one."""
        return self.data.mlm_probability if task_of(self.model).masked else 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is ModelConfig:
        return _build_tagged(tuple(family.config for family in FAMILIES.values()), value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (tp in (int, float) and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: Any, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}: unknown key (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{missing[0]}: missing")
    return cls(**kwargs)


def model_from_dict(value: Any, where: str = "model") -> ModelConfig:
    """A ``model`` section (a mapping with its ``family`` key), checked as a config file's is."""
    model = _coerce(value, ModelConfig, where)
    validate_model(model)
    return model


def _build_tagged(options: tuple[Any, ...], value: Any, where: str) -> Any:
    """The model section: its ``family`` key picks the family's dataclass; without one, the first family's."""
    by_tag = {o.__dataclass_fields__["family"].default: o for o in options}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    tag = value.get("family", next(iter(by_tag)))
    if tag not in by_tag:
        raise ConfigError(f"{where}.family: expected one of {' | '.join(map(repr, by_tag))}, got {tag!r}")
    return _build(by_tag[tag], value, where)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string (it wants ``3.0e-4``); learning rates are written that way."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to a raw config mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected key=value, e.g. optim.lr=3e-4")
    dotted, text = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = parse_yaml(text) if text.strip() else None


RENAMED_SECTIONS = {"task": "finetune"}
"""Sections under their earlier names, which configs and checkpoints written before the rename still use."""


def from_dict(raw: dict[str, Any]) -> Config:
    for old, new in RENAMED_SECTIONS.items():
        if old in raw:
            if raw.get(new) is not None:
                raise ConfigError(f"{old}: the earlier name of {new}; give one of them")
            raw = {new if key == old else key: value for key, value in raw.items()}
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(raw)


def _positive(value: int | float | None, where: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Checks that need no data or world size; see ``resolve`` for those that do."""
    validate_model(cfg.model)
    validate_trainer(cfg)
    validate_schedule_and_the_rest(cfg)
    if cfg.finetune is not None:
        _positive(cfg.finetune.max_length, "finetune.max_length")
        _positive(cfg.finetune.max_target_length, "finetune.max_target_length")
        _positive(cfg.finetune.num_beams, "finetune.num_beams")
        if cfg.finetune.train is None:
            raise ConfigError("finetune.train: missing (a .csv or .jsonl file of examples)")
        if cfg.data.path is None and not cfg.data.sources:
            return  # `lmscale finetune` prepares the labelled data and sets data.path
    cfg.data.resolved_sources()


def validate_model(m: ModelConfig) -> None:
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "seq_len", "vocab_size"):
        _positive(getattr(m, name, None), f"model.{name}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads}")
    for problem in m.problems():
        raise ConfigError(f"model.{problem}")
    _positive(getattr(m, "norm_eps", None), "model.norm_eps")  # the recurrent family has no norm
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")


def validate_trainer(cfg: Config) -> None:
    t = cfg.trainer
    _positive(t.max_steps, "trainer.max_steps")
    _positive(t.micro_batch_size, "trainer.micro_batch_size")
    _positive(t.grad_accum_steps, "trainer.grad_accum_steps")
    _positive(t.global_batch_size, "trainer.global_batch_size")
    _positive(t.eval_every_steps, "trainer.eval_every_steps", allow_zero=True)
    _positive(t.eval_batches, "trainer.eval_batches")
    _positive(t.max_rollbacks, "trainer.max_rollbacks", allow_zero=True)
    _positive(t.collective_timeout_minutes, "trainer.collective_timeout_minutes")
    _positive(t.step_timeout_minutes, "trainer.step_timeout_minutes")
    _positive(t.spike_sigma, "trainer.spike_sigma")
    if isinstance(t.activation_checkpointing, int):
        _positive(t.activation_checkpointing, "trainer.activation_checkpointing")
    if t.compile and cfg.zero.stage == 3:
        raise ConfigError(
            "trainer.compile: not with zero.stage 3, which gathers each layer's weights in module hooks that "
            "torch.compile cannot trace: every block breaks into small graphs around them, no faster than eager "
            "(measured); use zero.stage 1 or 2"
        )
    if t.spike_window < 20:
        raise ConfigError(
            f"trainer.spike_window: must be >= 20 (the history a spike is judged against), got {t.spike_window}"
        )
    validate_downstream(cfg)
    if t.spike_sigma is not None and cfg.zero.offload_optimizer != "none":
        raise ConfigError(
            "trainer.spike_sigma: not available with zero.offload_optimizer (the offloaded optimizer is DeepSpeed's "
            "CPU Adam, which cannot skip a step)"
        )


def validate_downstream(cfg: Config) -> None:
    names = [task.name for task in cfg.trainer.downstream]
    for i, task in enumerate(cfg.trainer.downstream):
        where = f"trainer.downstream[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", task.name) or names.count(task.name) > 1:
            raise ConfigError(f"{where}.name: {task.name!r} must be unique, of letters, digits, '_', '.', '-'")
        _positive(task.every_steps, f"{where}.every_steps")
        if not task_of(cfg.model).scores_continuations:
            raise ConfigError(
                f"{where}: a {cfg.model.family} model gives no likelihood of a continuation (a causal LM does)"
            )


def validate_schedule_and_the_rest(cfg: Config) -> None:
    t = cfg.trainer
    for name in ("mlm_probability", "mlm_eval_probability"):
        if not 0.0 < getattr(cfg.data, name) < 1.0:
            raise ConfigError(f"data.{name}: must be in (0, 1), got {getattr(cfg.data, name)}")
    _positive(cfg.optim.lr, "optim.lr")
    _positive(cfg.optim.grad_clip, "optim.grad_clip", allow_zero=True)
    _positive(cfg.schedule.warmup_steps, "schedule.warmup_steps", allow_zero=True)
    _positive(cfg.schedule.total_steps, "schedule.total_steps")
    if cfg.schedule.total_steps is not None and cfg.schedule.total_steps < t.max_steps:
        raise ConfigError(
            f"schedule.total_steps: {cfg.schedule.total_steps} is shorter than trainer.max_steps={t.max_steps}"
        )
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio: must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    _positive(cfg.checkpoint.every_steps, "checkpoint.every_steps", allow_zero=True)
    _positive(cfg.checkpoint.keep_last, "checkpoint.keep_last")
    _positive(cfg.checkpoint.keep_every_steps, "checkpoint.keep_every_steps", allow_zero=True)
    _positive(cfg.logging.every_steps, "logging.every_steps")
    _positive(cfg.logging.peak_flops, "logging.peak_flops")
    _positive(cfg.data.num_workers, "data.num_workers", allow_zero=True)
    _positive(cfg.data.lanes, "data.lanes")
    _positive(cfg.data.cache_limit_gb, "data.cache_limit_gb")
    if cfg.zero.offload_params != "none" and cfg.zero.stage != 3:
        raise ConfigError("zero.offload_params: parameter offload needs zero.stage: 3")
    for i, source in enumerate(cfg.data.sources):
        _positive(source.weight, f"data.sources[{i}].weight")


def pin_run_dir(cfg: Config, run_dir: str | Path) -> Config:
    """``cfg`` with ``run.dir`` set, so every rank, node and resume of the run agrees on its directory."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank, checked against the global batch size."""
    t = cfg.trainer
    per_pass = t.micro_batch_size * world_size
    if t.global_batch_size is None:
        return t.grad_accum_steps or 1
    if t.global_batch_size % per_pass:
        raise ConfigError(
            f"trainer.global_batch_size: {t.global_batch_size} is not divisible by "
            f"micro_batch_size * world_size = {t.micro_batch_size} * {world_size}"
        )
    accum = t.global_batch_size // per_pass
    if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
        raise ConfigError(
            f"trainer.grad_accum_steps: {t.grad_accum_steps} disagrees with global_batch_size "
            f"{t.global_batch_size} = micro_batch_size {t.micro_batch_size} * world {world_size} * {accum}"
        )
    return accum
