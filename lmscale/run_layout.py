"""The names inside a run directory, in one place: the launcher writes them, ranks, export, eval and the
report read them. The layout is documented in the README ("The run directory")."""

CONFIG = "config.yaml"
"""The resolved config every rank reads (global batch kept, micro-batches per step derived per start)."""
DEEPSPEED = "deepspeed.json"
LAUNCH = "launch.json"
"""Launch command, launch id, git commit, time: written last by the launcher."""
TOKENIZER = "tokenizer.json"
"""Copy of the dataset's tokenizer (export reads it)."""
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
