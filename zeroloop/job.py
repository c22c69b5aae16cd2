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
from .loop import LogSettings, TrainerLoop, TrainSummary
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


@dataclass
class GPTJob:
    """Settings of the main job. Defaults give a visible fall of the loss on 2 CPU cores
    within a few minutes (ln 256 = 5.55 nats/byte at the start)."""

    size: str = "tiny"
    seq_len: int = 128
    steps: int = 300
    stage: int = 2
    precision: str = "fp32"
    micro_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 2e-3
    warmup_steps: int = 30
    data: list[str] | None = None  # text files/folders; None: the standard library's source
    max_bytes: int | None = None
    output_dir: str = "runs/gpt"
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = 100
    config: Any = None  # a DeepSpeed config (dict or path) replacing DEFAULT_CONFIG
    progress_bar: bool = True
    save_every: int | None = None  # optimizer steps between checkpoints; None: no checkpoints
    resume: str | None = None  # "latest" or a checkpoint path (turns checkpointing on)
    weight_decay_groups: bool = True  # no weight decay on biases and LayerNorm weights
    gpt_overrides: dict = field(default_factory=dict)

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
