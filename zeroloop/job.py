"""The bundled main job: a byte-level GPT trained on the built-in corpus.

It is what the README's first command runs (two CPU ranks under ``deepspeed``, ZeRO-2)
and what the benchmarks train. It uses only the public ``TrainerLoop`` API.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import CheckpointSettings
from .config import Hyperparameters
from .corpus import VOCAB_SIZE, read_corpus, train_eval_split
from .gpt import GPT, GPT_SIZES, GPTConfig
from .loop import TrainerLoop
from .summary import LogSettings, TrainSummary
from .runtime import seed_everything

# "auto" values come from the job's arguments (Hyperparameters) and the world size.
DEFAULT_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": 1.0,
    # torch_adam: torch's AdamW, which needs no C++ build (DeepSpeed's FusedAdam compiles one
    # on first use: a minute or more on a CPU before the first step).
    "optimizer": {"type": "AdamW",
                  "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                             "torch_adam": True}},
    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"warmup_min_lr": 0.0, "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                             "total_num_steps": "auto"}},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
    "steps_per_print": 1_000_000,  # zeroloop's own bar and metrics.jsonl report progress
}


def option(default: Any = None, help: str | None = None, *, flags: tuple[str, ...] = (), cli: bool = True,
           **argparse_options: Any) -> Any:
    """A :class:`GPTJob` field with its documentation; ``zeroloop train`` makes its flag
    from the field (see :func:`zeroloop.cli.add_job_flags`).

    Args:
        default: the field's default (a mutable one is copied for every job).
        help: the flag's help text (``%(default)s`` is the default).
        flags: the flag's names; default ``--<name with dashes>``.
        cli: False for a field with no flag.
        argparse_options: passed to ``add_argument`` as they are (``choices``, ``metavar``).
    """
    metadata = {"help": help, "flags": flags, "cli": cli, "argparse": argparse_options}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class GPTJob:
    """Settings of the main job. Defaults give a visible fall of the loss on 2 CPU cores
    within a few minutes (ln 256 = 5.55 nats/byte at the start).

    Each field is also a flag of ``zeroloop train``, documented where it is declared."""

    steps: int = option(300, "optimizer steps (default %(default)s)")
    stage: int = option(2, "ZeRO stage (default %(default)s)", choices=range(4))
    precision: str = option("fp32", None, choices=("fp32", "bf16", "fp16"))
    size: str = option("tiny", "GPT size: tiny, small or medium (default %(default)s)")
    seq_len: int = option(128, "bytes per sample (default %(default)s)")
    micro_batch_size: int = option(16, "samples per rank per micro-step", flags=("--micro-batch",))
    gradient_accumulation_steps: int = option(1, flags=("--grad-accum",))
    lr: float = option(2e-3, "peak learning rate (default %(default)s)")
    warmup_steps: int = option(30, "warm-up steps (default %(default)s)", flags=("--warmup",))
    # None: the standard library's source
    data: list[str] | None = option(None, "text files or folders to train on", metavar="PATH")
    max_bytes: int | None = option(None, "read at most this many bytes of text")
    # A DeepSpeed config (dict or path) replacing DEFAULT_CONFIG. --deepspeed / --deepspeed_config:
    # the names launch lines of DeepSpeed and Hugging Face scripts use.
    config: Any = option(None, "a DeepSpeed JSON config replacing the built-in one",
                         flags=("--config", "--deepspeed", "--deepspeed_config"), metavar="JSON")
    output_dir: str = option("runs/gpt")
    seed: int = option(0)
    log_every: int = option(10)
    eval_every: int | None = option(100)
    progress_bar: bool = option(True, "no progress bar", flags=("--no-progress",))
    # None: no checkpoints
    save_every: int | None = option(None, "checkpoint every STEPS optimizer steps under OUTPUT_DIR/checkpoints, "
                                          "and write the final weights to OUTPUT_DIR/final as safetensors",
                                    metavar="STEPS")
    # Turns checkpointing on.
    resume: str | None = option(None, "resume from the newest complete checkpoint (latest) or a checkpoint "
                                      "folder", metavar="latest|PATH")
    weight_decay_groups: bool = option(True, "no weight decay on biases and LayerNorm weights", cli=False)
    gpt_overrides: dict = option({}, "GPTConfig fields replacing the size's", cli=False)

    def ds_config(self) -> Any:
        if self.config is not None:
            return self.config
        config = copy.deepcopy(DEFAULT_CONFIG)
        config["zero_optimization"]["stage"] = self.stage
        return config

    def model_config(self) -> GPTConfig:
        if self.size not in GPT_SIZES:
            raise ValueError(f"size: unknown GPT size {self.size!r}; choose one of {', '.join(GPT_SIZES)}")
        return GPTConfig(vocab_size=VOCAB_SIZE, block_size=self.seq_len, **GPT_SIZES[self.size],
                         **self.gpt_overrides)

    def checkpoint(self) -> CheckpointSettings | None:
        """Checkpoints (and final safetensors weights) when asked for, else None."""
        if self.save_every is None and self.resume is None:
            return None
        return CheckpointSettings(every=self.save_every, resume=self.resume)

    def hparams(self) -> Hyperparameters:
        return Hyperparameters(micro_batch_size=self.micro_batch_size,
                               gradient_accumulation_steps=self.gradient_accumulation_steps,
                               lr=self.lr, warmup_steps=self.warmup_steps, precision=self.precision)


def build_gpt_loop(job: GPTJob) -> TrainerLoop:
    """A ``TrainerLoop`` for the job: model seeded identically on every rank, data split
    into a training part and a held-out 1% for evaluation."""
    seed_everything(job.seed)
    model = GPT(job.model_config())
    train_set, eval_set = train_eval_split(read_corpus(job.data, job.max_bytes), job.seq_len)
    return TrainerLoop(model, job.ds_config(), train_data=train_set, eval_data=eval_set,
                       output_dir=job.output_dir, max_steps=job.steps, seed=job.seed,
                       hparams=job.hparams(), eval_every=job.eval_every, checkpoint=job.checkpoint(),
                       weight_decay_groups=job.weight_decay_groups,
                       log=LogSettings(every=job.log_every, progress_bar=job.progress_bar))


def run_gpt_job(job: GPTJob) -> TrainSummary:
    return build_gpt_loop(job).train()
