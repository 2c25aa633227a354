"""The ``lmscale`` command line's arguments. Each command names its handler (``args.handler``), which
``launcher.cli`` runs: the parser knows no command's code, so any module can parse a command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmscale.tasks import text_formats


def prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize raw text into WebDataset shards with Ray workers")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories or glob patterns, local or s3://: .txt/.jsonl (.gz/.zst), .parquet, "
                        "Arrow and datasets.save_to_disk directories")  # fmt: skip
    p.add_argument("--output", required=True, help="dataset directory to write, or s3://BUCKET/PREFIX")
    p.add_argument("--work-dir", help="where the tokenized inputs are kept while prepare runs (default: in the "
                                      "output; for an s3:// output a temporary directory)")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training sample (context length)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained tokenizer")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    p.add_argument("--tokenizer-kind", choices=["bpe", "wordpiece", "unigram"], default="bpe",
                   help="bpe (GPT), wordpiece (BERT) or unigram with T5's sentinels (T5)")  # fmt: skip
    p.add_argument(
        "--format",
        choices=text_formats(),
        default="causal",
        help="causal: GPT samples of seq-len + 1 tokens; mlm: BERT samples [CLS] ... [SEP], documents packed; "
        "span_corruption: T5 samples corrupted into inputs of seq-len as they are read",
    )
    p.add_argument("--tokenizer-sample-mb", type=float, default=64.0, help="text to train the tokenizer on")
    p.add_argument("--shard-size", default="64MB", help="samples per shard (10000) or a size (64MB)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in the validation split")
    p.add_argument("--text-field", default="text", help="the JSONL field, or parquet or Arrow column, holding the text")
    p.add_argument(
        "--txt-mode",
        choices=["paragraphs", "file"],
        default="paragraphs",
        help="documents in .txt files: separated by blank lines, or one per file",
    )
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    p.add_argument("--workers", type=int, help="Ray tasks in flight (default: all cores)")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument(
        "--in-process", action="store_true", help="run the tasks in this process, without Ray (small corpora)"
    )
    p.add_argument("--strict", action="store_true", help="fail on the first bad input line instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory or prefix")
    p.set_defaults(handler="prepare")


def submit_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="prepare a run and submit it as a cluster job (Slurm, Ray) or a local one")
    p.add_argument("config")
    p.add_argument("--backend", choices=["slurm", "ray", "local"], required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nproc", type=int, help="ranks per node (default: --gpus-per-node, or 1 on CPU nodes)")
    p.add_argument("--gpus-per-node", metavar="[TYPE:]N", help="GPUs per node, with Slurm's GPU type (h100:8)")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="memory of one GPU (default: from the type)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (default 1)")
    p.add_argument("--mem", help="host memory per node, Slurm syntax (64G)")
    p.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--job-name", help="default: run.name")
    p.add_argument(
        "--max-requeues", type=int, default=3, help="restarts from the latest checkpoint after a preemption (default 3)"
    )
    p.add_argument(
        "--signal-lead", type=int, default=300, metavar="SECONDS",
        help="Slurm: the ranks get SIGUSR1 this long before the time limit, to save (default 300)",
    )  # fmt: skip
    p.add_argument("--template", help="Slurm: the job script template (default cluster/slurm/lmscale.sbatch)")
    p.add_argument("--address", help="Ray: the cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--dry-run", action="store_true", help="print the checks, DeepSpeed config, script; submit nothing")
    p.set_defaults(handler="submit")

    p = sub.add_parser("jobs", help="the jobs submitted from this machine, with their state")
    p.add_argument("--last", type=int, default=20, help="how many of the latest to show")
    p.set_defaults(handler="jobs")
    for name, text in (("status", "the state of a job; for a run directory, also which job holds it now"),
                       ("cancel", "cancel a job")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("job", help="a job id or a run directory (its latest job)")
        p.set_defaults(handler=name)
    p = sub.add_parser("logs", help="the output of a job")
    p.add_argument("job", help="a job id or a run directory (its latest job)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(handler="logs")


def inspect_parser(sub: argparse._SubParsersAction) -> None:
    """Dataset tools: `lmscale data inspect`, `lmscale data pairs`."""
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="summarise a prepared dataset, verify checksums, decode samples")
    p.add_argument("dataset", help="a dataset directory, or its URL (s3://BUCKET/PREFIX, https://...)")
    p.add_argument("--samples", type=int, default=2, help="samples to decode back to text")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every shard")
    p.set_defaults(handler="inspect")
    p = data.add_parser("pairs", help="translation pairs from this machine's gettext catalogs (English -> LANG)")
    p.add_argument("--lang", required=True, help="a language of /usr/share/locale: de, fr, zh_CN, ...")
    p.add_argument("--output", required=True, help="directory for train.jsonl and validation.jsonl")
    p.add_argument("--validation-percent", type=int, default=10, help="share of the catalogs held out")
    p.add_argument("--locale-dir", default="/usr/share/locale")
    p.set_defaults(handler="pairs")


def train_parsers(sub: argparse._SubParsersAction) -> None:
    """`lmscale train` and `lmscale finetune`, which share their flags."""
    for name, finetune, summary in (
        ("train", False, "train from a YAML config with DeepSpeed, on one node or several"),
        (
            "finetune",
            True,
            "fine-tune a pretrained BERT for sequence classification (a config with a finetune section)",
        ),
    ):
        p = sub.add_parser(name, help=summary)
        p.add_argument("config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        p.add_argument("--nproc", type=int, help="ranks on this node (default: GPUs, or 1 on CPU)")
        p.add_argument("--dry-run", action="store_true", help="print the resolved and DeepSpeed configs and exit")
        p.add_argument(
            "--prepare-only", action="store_true", help="write the run directory, print the per-rank command, and exit"
        )
        p.add_argument("--resume", default="auto", help="auto (latest checkpoint if any), none, or a checkpoint tag")
        p.add_argument(
            "--stop-grace-s", type=float, default=600.0,
            help="after SIGTERM/SIGUSR1/Ctrl-C, how long the ranks get to save and exit before they are killed (600)",
        )  # fmt: skip
        p.add_argument("--nnodes", type=int, default=1, help="nodes in the job; run the same command on each")
        p.add_argument("--node-rank", type=int, default=0, help="this node's index in [0, --nnodes); node 0 hosts")
        p.add_argument("--master-addr", help="address of node 0 that every node reaches (needed with --nnodes > 1)")
        p.add_argument(
            "--master-port", type=int, help="rendezvous port on node 0 (default: 29500 with --nnodes, else a free one)"
        )
        p.add_argument("--hostfile", help="start the ranks on these hosts with DeepSpeed's launcher (`HOST slots=N`)")
        p.add_argument("--peak-flops", type=float, help="peak FLOP/s of one device for MFU (sets logging.peak_flops)")
        p.set_defaults(handler="train", finetune=finetune)


def export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a ZeRO checkpoint to a Hugging Face model directory")
    p.add_argument("run_dir", help="runs/<name>")
    p.add_argument(
        "--checkpoint",
        default="auto",
        help="a tag (step_00000040), latest, best (a fine-tuning run's best validation accuracy), or auto: best "
        "when the run has one, else latest",
    )
    p.add_argument("--output", required=True, help="directory to write, e.g. exported/<name>")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(handler="export")


def generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample from an exported model (KV cache, no DeepSpeed)")
    p.add_argument("model", help="an exported model directory")
    p.add_argument("--prompt", "--input", action="append", required=True,
                   help="repeat for a batch: a decoder's prompts to continue, an encoder-decoder's inputs")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1, help="an encoder-decoder's beam search (1: greedy)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (a decoder's sampling)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler="generate")


def eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score an exported model or a run's checkpoint: LM loss, masked-LM accuracy, classification"
    )
    p.add_argument("model", help="an exported model directory or runs/<name>")
    scored = p.add_mutually_exclusive_group(required=True)
    scored.add_argument(
        "--data", nargs="+",
        help="a prepared dataset directory or text files (language models); a .csv or .jsonl of labelled examples "
        "(a classifier) or of source/target pairs (an encoder-decoder: BLEU and chrF)",
    )  # fmt: skip
    scored.add_argument(
        "--task", type=Path,
        help='a multiple-choice task: JSONL rows {"context": ..., "choices": [...], "label": N} (acc, acc_norm)',
    )  # fmt: skip
    p.add_argument("--split", default="validation", help="split of a prepared dataset")
    p.add_argument("--batch-size", type=int, default=8, help="windows, examples or scored choices per forward pass")
    p.add_argument("--max-batches", type=int, help="stop after this many batches")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="share of tokens a masked LM is scored on")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks (masked LM)")
    p.add_argument("--source-field", default="source", help="the field of a pair's source text")
    p.add_argument("--target-field", default="target", help="the field of a pair's reference translation")
    p.add_argument("--num-beams", type=int, default=1, help="an encoder-decoder's beam search (1: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the longest output an encoder-decoder writes")
    p.add_argument("--outputs", type=Path, help="write each pair's source, reference and output here (JSONL)")
    p.add_argument("--per-position", action="store_true",
                   help="a causal LM's loss at each position of the window, written as JSON and a plot")  # fmt: skip
    p.add_argument("--json", type=Path,
                   help="where --per-position writes (a .png beside it; default: MODEL/per_position.json)")  # fmt: skip
    p.set_defaults(handler="eval")


def report_and_demo_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot a run's metrics.jsonl and summarise it, or compare several runs")
    p.add_argument("run_dir", nargs="+", help="a run directory; several: their curves overlaid and a table")
    p.add_argument("--output", help="a .png or .html file (default: <run_dir>/report.png; several runs: "
                   "comparison.png here)")  # fmt: skip
    p.set_defaults(handler="report")

    p = sub.add_parser("demo", help="the whole path on a small corpus built from Python's own docstrings")
    p.add_argument("--workdir", default="demo", help="where the corpus, dataset and run go")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=150)
    p.set_defaults(handler="demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmscale", description="Pretrain GPT/BERT models with DeepSpeed ZeRO.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare_parser(sub)
    inspect_parser(sub)
    train_parsers(sub)
    submit_parsers(sub)
    export_parser(sub)
    generate_parser(sub)
    eval_parser(sub)
    report_and_demo_parsers(sub)
    return parser
