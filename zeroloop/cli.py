"""The ``zeroloop`` command line.

``zeroloop --version``; ``zeroloop train`` runs the bundled byte-level GPT job;
``zeroloop inspect`` describes a checkpoint; ``zeroloop universal`` converts one to
DeepSpeed's universal checkpoint. Launch it
on several ranks with ``deepspeed -q --num_gpus 2 --module zeroloop train`` or
``torchrun --nproc_per_node 2 -m zeroloop train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any

from .errors import CheckpointError, ConfigError
from .version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroloop", description="DeepSpeed training, made boring.")
    parser.add_argument("--version", action="version", version=f"zeroloop {__version__}")
    # The deepspeed launcher puts --local_rank=N before the command; the rank comes from
    # the environment it also sets.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(reported_errors=())  # what a command prints as "zeroloop COMMAND: error: ..."
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_command(commands)
    add_plan_command(commands)
    add_consolidate_command(commands)
    add_report_command(commands)
    add_inspect_command(commands)
    add_universal_command(commands)
    return parser


def add_train_command(commands) -> None:
    from .job import GPTJob

    p = commands.add_parser("train", help="train the bundled byte-level GPT on the built-in corpus",
                            description="Train the bundled byte-level GPT. Without --data it reads the "
                                        "Python standard library's own source as a byte corpus.")
    add_job_flags(p, GPTJob)
    p.set_defaults(run=run_train)


def add_job_flags(parser: argparse.ArgumentParser, job_class: type) -> None:
    """One flag per field of a job dataclass, from the field: its name (``seq_len`` ->
    ``--seq-len``, or the field's ``flags``), type, default and help. A ``bool`` field that
    defaults to True becomes a ``--no-...`` switch; a list field takes one or more values."""
    hints = typing.get_type_hints(job_class)
    for spec in dataclasses.fields(job_class):
        meta = spec.metadata
        if not meta.get("cli", False):
            continue
        flags = meta["flags"] or ("--" + spec.name.replace("_", "-"),)
        options = {"dest": spec.name, "default": spec.default, "help": meta["help"], **meta["argparse"]}
        kind = _without_none(hints[spec.name])
        if kind is bool:
            options.update(action="store_false" if spec.default else "store_true")
        else:
            if "choices" not in options:  # argparse lists the choices instead
                options.setdefault("metavar", flags[0].lstrip("-").replace("-", "_").upper())
            if typing.get_origin(kind) is list:
                options["nargs"], kind = "+", typing.get_args(kind)[0]
            if kind in (int, float):  # str and Any (a path) stay strings
                options["type"] = kind
        parser.add_argument(*flags, **options)


def _without_none(kind: Any) -> Any:
    """``int | None`` -> ``int``; other types as they are."""
    args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return kind


def run_train(args: argparse.Namespace) -> int:
    from .job import GPTJob, run_gpt_job
    from .runtime import rank

    job = GPTJob(**{name: getattr(args, name) for name in job_flag_names(GPTJob)})
    summary = run_gpt_job(job)
    if rank() == 0:
        first = summary.history[0]["loss"] if summary.history else None
        report = {"steps": summary.steps, "first_logged_loss": first, "final_loss": summary.final_loss,
                  "eval_loss": summary.eval_loss, "samples_per_sec": round(summary.samples_per_sec, 2),
                  "tokens_per_sec": round(summary.tokens_per_sec or 0, 1),
                  "wall_time_s": round(summary.wall_time_s, 1), "output_dir": job.output_dir}
        print(json.dumps(report), flush=True)
    return 0


def job_flag_names(job_class: type) -> list[str]:
    """The fields of a job dataclass that ``add_job_flags`` made flags of."""
    return [spec.name for spec in dataclasses.fields(job_class) if spec.metadata.get("cli", False)]


def add_plan_command(commands) -> None:
    p = commands.add_parser("plan", help="price every ZeRO stage for a model size and recommend one",
                            description="Per-device memory of DDP, ZeRO-1/2/3 and the offload options, "
                                        "whether each fits, and the stage to use. GB = 1e9 bytes, "
                                        "GiB = 2^30 bytes; sizes accept either (24GB, 80GiB).")
    p.add_argument("--params", required=True, help="parameter count, e.g. 7e9 or 7B")
    p.add_argument("--gpus", type=int, default=1, help="devices per node (default %(default)s)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default %(default)s)")
    p.add_argument("--gpu-memory", default=None, help="memory per device, e.g. 24GB or 80GiB")
    p.add_argument("--host-memory", default=None, help="host RAM per node, e.g. 512GB (default: unchecked)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16", "autocast"),
                   help="bf16/fp16: 16-bit weights and an fp32 master (DeepSpeed's bf16/fp16 modes); "
                        "autocast: fp32 weights and gradients, 16-bit compute (DeepSpeed's torch_autocast); "
                        "default: the --config's, else bf16")
    p.add_argument("--optimizer", default="adam",
                   help="adam, adamw, lamb, adagrad, lion, sgd, sgd-nomomentum, or K in bytes per parameter "
                        "(default %(default)s)")
    p.add_argument("--largest-layer", default=None, help="parameters of the largest layer (ZeRO-3's gather)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample, for activations")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per device per micro-step")
    p.add_argument("--hidden", type=int, default=None, help="hidden size, for activations and bucket advice")
    p.add_argument("--layers", type=int, default=None, help="transformer layers, for activations")
    p.add_argument("--checkpointing", action="store_true", help="count activations with checkpointing")
    p.add_argument("--config", default=None,
                   help="a DeepSpeed JSON config (buckets, precision, current stage)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of a table")
    p.set_defaults(run=run_plan)


# plan() argument -> the flag that sets it, so errors name what the user typed.
PLAN_FLAGS = {"params": "--params", "world_size": "--gpus x --nodes", "devices_per_node": "--gpus",
              "device_memory": "--gpu-memory", "host_memory": "--host-memory", "optimizer": "--optimizer",
              "largest_layer": "--largest-layer", "micro_batch": "--micro-batch", "seq_len": "--seq-len",
              "hidden_size": "--hidden", "layers": "--layers"}


def run_plan(args: argparse.Namespace) -> int:
    import contextlib

    from .config import load_config
    from .memory import plan
    from .sizes import parse_count

    try:
        # DeepSpeed logs to stdout when first imported; keep stdout for the plan (--json).
        with contextlib.redirect_stdout(sys.stderr):
            result = plan(params=parse_count(args.params), world_size=args.gpus * args.nodes,
                          devices_per_node=args.gpus, device_memory=args.gpu_memory,
                          host_memory=args.host_memory, precision=args.precision,
                          optimizer=parse_count(args.optimizer),
                          largest_layer=parse_count(args.largest_layer),
                          micro_batch=args.micro_batch, seq_len=args.seq_len, hidden_size=args.hidden,
                          layers=args.layers, activation_checkpointing=args.checkpointing,
                          ds_config=load_config(args.config) if args.config else None)
    except ConfigError as e:
        problems = [name_flags(p) for p in e.problems]
        error = ConfigError(problems, source=args.config, subject="arguments")
        print(f"zeroloop plan: {error}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.table())
    return 0


def name_flags(problem: str) -> str:
    """``"seq_len, layers: ..."`` -> ``"--seq-len, --layers: ..."``."""
    names, _, rest = problem.partition(":")
    return ", ".join(PLAN_FLAGS.get(name, name) for name in names.split(", ")) + ":" + rest


def add_consolidate_command(commands) -> None:
    p = commands.add_parser("consolidate", help="write a DeepSpeed checkpoint's weights as safetensors",
                            description="Consolidate a DeepSpeed checkpoint (ZeRO stage 0-3, any world size) "
                                        "into Hugging Face-layout safetensors: model.safetensors, or shards "
                                        "plus model.safetensors.index.json. Streams: memory stays flat.")
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR",
                   help="the folder given to engine.save_checkpoint (or a tag folder inside it)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="where the safetensors files go")
    p.add_argument("--tag", default=None, help="the tag to read (default: the one in 'latest')")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the floating-point weights (default %(default)s)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB or 500MB "
                                                           "(default %(default)s)")
    p.add_argument("--exclude-frozen", action="store_true", help="leave out parameters that were not trained")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_consolidate, reported_errors=(CheckpointError,))


def run_consolidate(args: argparse.Namespace) -> int:
    from .consolidation import consolidate

    result = consolidate(args.checkpoint_dir, args.output_dir, tag=args.tag, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, exclude_frozen=args.exclude_frozen,
                         progress=not args.no_progress)
    print(json.dumps({"output_dir": result.output_dir, "files": result.files, "total_size": result.total_size,
                      "tensors": result.num_tensors, "ties": result.ties, "stage": result.stage,
                      "world_size": result.world_size, "tag": result.tag}), flush=True)
    return 0


def add_report_command(commands) -> None:
    p = commands.add_parser("report", help="plot runs' metrics to a PNG and print a summary table",
                            description="Draw the loss and eval loss, learning rate, gradient norm, throughput "
                                        "and fp16 loss scale of one or more runs (overlaid) over optimizer steps, "
                                        "from their metrics.jsonl, to a PNG; print a short table. The plot needs "
                                        "matplotlib (pip install \"zeroloop[report]\").")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (holding metrics.jsonl)")
    p.add_argument("--out", default=None,
                   help="the PNG to write (default: RUN_DIR/report.png for one run, ./report.png for several)")
    p.add_argument("--no-plot", action="store_true", help="only the table")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from .report import report

    try:
        table, png = report(args.run_dirs, out=args.out, plot=not args.no_plot)
    except ConfigError as e:
        print(f"zeroloop report: {e}", file=sys.stderr)
        return 2
    print(table)
    if png:
        print(f"wrote {png}")
    return 0


def add_inspect_command(commands) -> None:
    p = commands.add_parser("inspect", help="show a checkpoint's manifest: step, layout, files, completeness",
                            description="Describe a checkpoint from its manifest (JSON only, nothing is "
                                        "unpickled): step and data position, world size, ZeRO stage, "
                                        "precision, batch sizes, every file with its size, and whether it is "
                                        "complete. Given the folder holding 'latest', describes every tag.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a tag folder, or the folder holding 'latest'")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-files", action="store_true", help="leave out the list of files")
    p.set_defaults(run=run_inspect, reported_errors=(CheckpointError,))


def run_inspect(args: argparse.Namespace) -> int:
    from .inspection import format_inspection, inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    print(json.dumps(info, indent=1) if args.json else format_inspection(info, files=not args.no_files))
    return 0


def add_universal_command(commands) -> None:
    p = commands.add_parser("universal", help="convert a checkpoint to DeepSpeed's universal checkpoint",
                            description="Write DeepSpeed's universal checkpoint of a checkpoint saved at any "
                                        "ZeRO stage, precision and world size, streaming (one parameter in "
                                        "memory at a time). Resuming on another layout does this by itself; "
                                        "use it to convert ahead of time, or for DeepSpeed's own "
                                        "\"load_universal\".")
    p.add_argument("checkpoint", metavar="TAG_DIR", help="the checkpoint's tag folder")
    p.add_argument("--output", default=None, help="where to write it (default: TAG_DIR.universal, the folder a "
                                                  "resume looks for)")
    p.set_defaults(run=run_universal, reported_errors=(CheckpointError,))


def run_universal(args: argparse.Namespace) -> int:
    from .universal import convert_to_universal

    output = convert_to_universal(args.checkpoint, args.output)
    print(json.dumps({"output_dir": output}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except args.reported_errors as e:  # a checkpoint tool's error is one line, not a traceback
        print(f"zeroloop {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
