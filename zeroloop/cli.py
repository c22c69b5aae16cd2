"""The ``zeroloop`` command line.

``zeroloop --version``; ``zeroloop train`` runs the bundled byte-level GPT job. Launch it
on several ranks with ``deepspeed --num_gpus 2 --module zeroloop train`` or
``torchrun --nproc_per_node 2 -m zeroloop train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

log = logging.getLogger("zeroloop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroloop", description="DeepSpeed training, made boring.")
    parser.add_argument("--version", action="version", version=f"zeroloop {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_command(commands)
    add_consolidate_command(commands)
    return parser


def add_train_command(commands) -> None:
    from .job import GPTJob

    d = GPTJob()
    p = commands.add_parser("train", help="train the bundled byte-level GPT on the built-in corpus",
                            description="Train the bundled byte-level GPT. Without --data it reads the "
                                        "Python standard library's own source as a byte corpus.")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--stage", type=int, default=d.stage, choices=range(4), help="ZeRO stage (default %(default)s)")
    p.add_argument("--precision", default=d.precision, choices=("fp32", "bf16", "fp16"))
    p.add_argument("--size", default=d.size, help="GPT size: tiny, small or medium (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="bytes per sample (default %(default)s)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch_size, help="samples per rank per micro-step")
    p.add_argument("--grad-accum", type=int, default=d.gradient_accumulation_steps)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup_steps, help="warm-up steps (default %(default)s)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH", help="text files or folders to train on")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of text")
    p.add_argument("--config", default=None, help="a DeepSpeed JSON config replacing the built-in one")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .job import GPTJob, run_gpt_job
    from .runtime import rank

    job = GPTJob(size=args.size, seq_len=args.seq_len, steps=args.steps, stage=args.stage,
                 precision=args.precision, micro_batch_size=args.micro_batch,
                 gradient_accumulation_steps=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
                 data=args.data, max_bytes=args.max_bytes, output_dir=args.output_dir, seed=args.seed,
                 log_every=args.log_every, eval_every=args.eval_every, config=args.config,
                 progress_bar=not args.no_progress)
    summary = run_gpt_job(job)
    if rank() == 0:
        first = summary.history[0]["loss"] if summary.history else None
        report = {"steps": summary.steps, "first_logged_loss": first, "final_loss": summary.final_loss,
                  "eval_loss": summary.eval_loss, "samples_per_sec": round(summary.samples_per_sec, 2),
                  "tokens_per_sec": round(summary.tokens_per_sec or 0, 1),
                  "wall_time_s": round(summary.wall_time_s, 1), "output_dir": job.output_dir}
        print(json.dumps(report), flush=True)
    return 0


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
    p.set_defaults(run=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> int:
    from .consolidate import CheckpointError, consolidate

    try:
        result = consolidate(args.checkpoint_dir, args.output_dir, tag=args.tag, dtype=args.dtype,
                             max_shard_size=args.max_shard_size, exclude_frozen=args.exclude_frozen,
                             progress=not args.no_progress)
    except CheckpointError as e:
        print(f"zeroloop consolidate: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"output_dir": result.output_dir, "files": result.files, "total_size": result.total_size,
                      "tensors": result.num_tensors, "ties": result.ties, "stage": result.stage,
                      "world_size": result.world_size, "tag": result.tag}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[zeroloop] %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
