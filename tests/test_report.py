"""``zeroloop report``: real runs' metrics to a PNG and a table."""

import json

import pytest
import torch

from zeroloop import Hyperparameters, LogSettings, TrainerLoop, cli
from zeroloop.config import ConfigError
from zeroloop.corpus import ByteCorpus, read_corpus
from zeroloop.gpt import GPT
from zeroloop.report import read_run
from zeroloop.testing import single_process


def short_gpt_run(output_dir, lr):
    """A real run: the bundled GPT for 12 steps, logging every 2, evaluating every 4."""
    torch.manual_seed(0)
    model = GPT(n_layer=1, n_head=2, n_embd=32, block_size=32)
    text = read_corpus(max_bytes=60_000)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": 3,
                                                                 "total_num_steps": "auto"}},
              "zero_optimization": {"stage": 1}, "steps_per_print": 1_000_000}
    with single_process():
        TrainerLoop(model, config, train_data=ByteCorpus(text[:50_000], 32),
                    eval_data=ByteCorpus(text[50_000:], 32), output_dir=output_dir, max_steps=12, eval_every=4, hparams=Hyperparameters(lr=lr),
                    log=LogSettings(every=2, progress_bar=False)).train()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    short_gpt_run(root / "lr3e-3", 3e-3)
    short_gpt_run(root / "lr1e-3", 1e-3)
    return root / "lr3e-3", root / "lr1e-3"


def test_report_draws_overlaid_runs_and_prints_a_table(two_runs, tmp_path, capsys):
    import matplotlib.image

    png = tmp_path / "report.png"
    assert cli.main(["report", *map(str, two_runs), "--out", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "steps", "first"]
    assert [line.split()[0] for line in out[1:3]] == ["lr3e-3", "lr1e-3"]
    assert [line.split()[1] for line in out[1:3]] == ["12", "12"]
    assert out[3] == f"wrote {png}"
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (800, 1500)
    assert image[..., :3].std() > 0.05  # not blank: curves, labels, grid


def test_report_reads_train_and_eval_records_in_step_order(two_runs):
    run = read_run(two_runs[0])
    assert [r["step"] for r in run.train] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in run.evals] == [4, 8, 12]
    steps, lrs = run.series("lr")
    assert steps == [2, 4, 6, 8, 10, 12] and max(lrs) == pytest.approx(3e-3)


def test_repeated_steps_keep_the_last_record(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.0},
             {"step": 2, "eval_loss": 2.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = read_run(tmp_path)
    assert run.series("loss") == ([1, 2], [3.0, 2.0])
    assert run.series("eval_loss", run.evals) == ([2], [2.2])


def test_a_folder_without_metrics_is_named(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "--no-plot"]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="output_dir of a run"):
        read_run(tmp_path)
