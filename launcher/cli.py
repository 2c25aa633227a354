"""The ``lmscale`` command line. Entry points only parse arguments and call into ``lmscale`` or ``launcher``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from launcher.parser import build_parser
from lmscale import run_layout
from lmscale.errors import LmscaleError, UsageError, one_line

log = logging.getLogger("lmscale")


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmscale.data.object_store import is_s3
    from lmscale.data.shard import PrepareOptions, prepare, summary
    from lmscale.data.sources import ReadOptions

    options = PrepareOptions(
        inputs=args.input,
        output=args.output if is_s3(args.output) else Path(args.output),
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        tokenizer_kind=args.tokenizer_kind,
        format=args.format,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        dedup=args.dedup,
        workers=args.workers,
        ray_address=args.ray_address,
        in_process=args.in_process,
        read=ReadOptions(text_field=args.text_field, txt_mode=args.txt_mode, strict=args.strict),
        overwrite=args.overwrite,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )
    manifest = prepare(options)
    print(summary(manifest, options.output))
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from lmscale.data.translation_pairs import language_pairs, write_pairs

    if not 0 < args.validation_percent < 100:
        raise UsageError(f"--validation-percent {args.validation_percent}: must be in (0, 100)")
    splits = language_pairs(args.lang, Path(args.locale_dir), args.validation_percent)
    counts = write_pairs(splits, Path(args.output))
    catalogs = {name: len({pair.catalog for pair in pairs}) for name, pairs in splits.items()}
    for name, count in counts.items():
        print(f"wrote {Path(args.output) / name}.jsonl: {count:,} pairs from {catalogs[name]} catalogs")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from launcher.inspect_data import inspect_dataset

    return inspect_dataset(args.dataset, samples=args.samples, verify=not args.no_verify)


def cmd_train(args: argparse.Namespace) -> int:
    from lmscale.job.signals import LauncherStopRequest

    # A stop signal during start-up (imports, writing the run directory) is kept for the ranks, which honour
    # it before their first step, instead of killing this process with the job half started.
    early = None if args.dry_run or args.prepare_only or args.hostfile else LauncherStopRequest()
    from launcher.train import train
    from lmscale.job.exit_codes import exit_process

    # Its ranks have exited: nothing is left to finish but the interpreter's slow teardown of torch.
    exit_process(train(args, early))


def submit_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import launcher.submit

        return getattr(launcher.submit, name)(args)

    return run


def cmd_export(args: argparse.Namespace) -> int:
    from lmscale.export.export import export_checkpoint

    result = export_checkpoint(
        Path(args.run_dir), Path(args.output), args.checkpoint, args.dtype, args.overwrite, args.max_shard_size
    )
    print(
        f"exported {args.run_dir} {result.tag} -> {result.output} ({result.architecture}, {args.dtype}); "
        f"logits check: max |diff| {result.max_abs_diff:.3g} <= tolerance {result.tolerance:.3g}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lmscale.report import write_comparison, write_report

    if len(args.run_dir) > 1:
        output = Path(args.output or "comparison.png")
        print(write_comparison([Path(d) for d in args.run_dir], output))
        print(f"wrote {output}")
        return 0
    run_dir = Path(args.run_dir[0])
    output = Path(args.output) if args.output else run_dir / run_layout.REPORT
    summary = write_report(run_dir, output)
    for name, value in summary.rows():
        print(f"{name:<16} {value}")
    print(f"wrote {output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from launcher.demo import demo

    return demo(Path(args.workdir), nproc=args.nproc, steps=args.steps)


def infer_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import launcher.infer

        return getattr(launcher.infer, name)(args)

    return run


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare,
    "inspect": cmd_inspect,
    "pairs": cmd_pairs,
    "train": cmd_train,
    "submit": submit_command("submit"),
    "jobs": submit_command("cmd_jobs"),
    "status": submit_command("cmd_status"),
    "cancel": submit_command("cmd_cancel"),
    "logs": submit_command("cmd_logs"),
    "export": cmd_export,
    "generate": infer_command("cmd_generate"),
    "eval": infer_command("cmd_eval"),
    "report": cmd_report,
    "demo": cmd_demo,
}
"""What each command of ``launcher.parser`` runs; the heavy modules are imported by the command that needs them."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return HANDLERS[args.handler](args)
    except LmscaleError as err:
        if args.debug:
            raise
        print(f"lmscale: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("lmscale: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
