"""Metrics in DeepSpeed's monitors (TensorBoard, CSV) and custom metrics through ``log_metrics``."""

import csv
import glob
import json
import os

import pytest
from helpers import RegressionData, make_model

from zeroloop import ConfigError, LogSettings, TrainerLoop
from zeroloop import monitors
from zeroloop.metrics import CustomMetrics
from zeroloop.monitors import missing_package_problems, monitor_events, with_output_paths
from zeroloop.testing import run_ranks, single_process, tiny_config

STEPS, LOG_EVERY, EVAL_EVERY, MICRO = 4, 2, 2, 2


class WithCustomMetrics(TrainerLoop):
    """Logs this rank's number twice per micro-batch: averaged over ranks, and rank 0's own."""

    def compute_loss(self, batch):
        self.log_metrics({"rank_mean": float(self.rank)}, mean_over_ranks=True)
        self.log_metrics({"rank_own": self.rank})
        return super().compute_loss(batch)


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_csv_files(folder):
    series = {}
    for path in glob.glob(os.path.join(folder, "*.csv")):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        series[os.path.basename(path)] = rows
    return series


def monitored_ranks(rank, root):
    config = tiny_config(stage=2, micro=MICRO)
    config["tensorboard"] = {"enabled": True, "job_name": "tb"}  # output_path: under output_dir
    config["csv_monitor"] = {"enabled": True, "output_path": os.path.join(root, "csv"), "job_name": "job"}
    loop = WithCustomMetrics(make_model(), config, train_data=RegressionData(), eval_data=RegressionData(16),
                             output_dir=os.path.join(root, "run"), max_steps=STEPS, eval_every=EVAL_EVERY,
                             log=LogSettings(every=LOG_EVERY, progress_bar=False))
    summary = loop.train()
    if rank != 0:
        return None
    with open(os.path.join(root, "run", "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return {"history": summary.history, "lines": lines,
            "tensorboard": read_tensorboard(os.path.join(root, "run", "tensorboard", "tb")),
            "csv": read_csv_files(os.path.join(root, "csv", "job"))}


@pytest.mark.multirank
def test_monitors_and_custom_metrics_on_two_ranks(tmp_path):
    result = run_ranks(monitored_ranks, 2, str(tmp_path))[0]
    history, lines, tb, csv_files = result["history"], result["lines"], result["tensorboard"], result["csv"]
    samples_per_step = 2 * MICRO  # 2 ranks

    # Custom metrics: averaged over ranks where asked, rank 0's otherwise; in history and metrics.jsonl.
    assert [r["step"] for r in history] == [2, 4]
    assert all(r["rank_mean"] == 0.5 and r["rank_own"] == 0 for r in history)
    train_lines = [line for line in lines if "loss" in line]
    eval_lines = [line for line in lines if "eval_loss" in line]
    assert train_lines == history
    assert [line["step"] for line in eval_lines] == [2, 4]  # eval_every=2 (none repeated at the end)
    assert all(line["eval_rank_mean"] == 0.5 for line in eval_lines)  # logged while evaluating

    # TensorBoard: zeroloop's series at the logging cadence, DeepSpeed's lr every step,
    # all on the samples axis.
    def xs(tag):
        return [x for x, _ in tb[tag]]

    assert xs("Train/Samples/train_loss") == [2 * samples_per_step, 4 * samples_per_step]
    assert [v for _, v in tb["Train/Samples/train_loss"]] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    assert [v for _, v in tb["Train/Samples/eval_loss"]] == pytest.approx([r["eval_loss"] for r in eval_lines],
                                                                           rel=1e-6)
    assert xs("Train/Samples/lr") == [s * samples_per_step for s in range(1, STEPS + 1)]
    assert [v for _, v in tb["Train/Samples/lr"]] == pytest.approx([1e-3] * STEPS)
    for name in ("grad_norm", "samples_per_sec", "rank_mean", "eval_rank_mean"):
        assert len(tb[f"Train/Samples/{name}"]) == 2, name

    # CSV: one file per series, DeepSpeed's layout.
    loss_rows = csv_files["Train_Samples_train_loss.csv"]
    assert loss_rows[0] == ["step", "train_loss"] and len(loss_rows) == 3
    assert [float(v) for _, v in loss_rows[1:]] == pytest.approx([r["loss"] for r in history])
    assert "Train_Samples_eval_loss.csv" in csv_files and "Train_Samples_lr.csv" in csv_files


def test_monitor_events_leave_out_what_deepspeed_writes_and_positions():
    record = {"step": 3, "epoch": 0, "lr": 1e-3, "loss_scale": 256.0, "overflow": False, "skipped_steps": 1,
              "loss": 2.5, "grad_norm": 0.5, "tokens_per_sec": None, "accuracy": 0.75}
    assert monitor_events(record, 96) == [("Train/Samples/skipped_steps", 1.0, 96),
                                          ("Train/Samples/train_loss", 2.5, 96),
                                          ("Train/Samples/grad_norm", 0.5, 96),
                                          ("Train/Samples/accuracy", 0.75, 96)]


def test_missing_monitor_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(monitors.importlib.util, "find_spec", lambda name: None)
    config = {"tensorboard": {"enabled": True}, "wandb": {"enabled": True}, "comet": {"enabled": False},
              "csv_monitor": {"enabled": True}}
    problems = missing_package_problems(config)
    assert len(problems) == 2
    assert 'pip install "zeroloop[tensorboard]"' in problems[0] and problems[0].startswith("tensorboard.enabled")
    assert 'pip install "zeroloop[wandb]"' in problems[1]


def test_missing_monitor_package_fails_before_the_engine_is_built(monkeypatch, tmp_path):
    import deepspeed

    def no_engine(**kwargs):
        raise AssertionError("deepspeed.initialize must not be reached")

    monkeypatch.setattr(deepspeed, "initialize", no_engine)
    monkeypatch.setattr(monitors.importlib.util, "find_spec", lambda name: None)
    config = dict(tiny_config(), wandb={"enabled": True, "project": "p"})
    with single_process(), pytest.raises(ConfigError, match=r"zeroloop\[wandb\]"):
        TrainerLoop(make_model(), config, train_data=RegressionData(), output_dir=tmp_path, max_steps=1).setup()


def test_monitor_files_go_under_output_dir_unless_placed():
    config = {"tensorboard": {"enabled": True}, "csv_monitor": {"enabled": True, "output_path": "/elsewhere"}}
    with_output_paths(config, "runs/a")
    assert config["tensorboard"]["output_path"] == os.path.join("runs/a", "tensorboard")
    assert config["csv_monitor"]["output_path"] == "/elsewhere"


def test_custom_metrics_are_window_means_and_checked():
    metrics = CustomMetrics()
    metrics.add({"a": 1.0, "b": 2}, mean_over_ranks=False)
    metrics.add({"a": 3.0}, mean_over_ranks=False)
    assert metrics.reduce(device="cpu") == {"a": 2.0, "b": 2.0}
    assert metrics.reduce(device="cpu") == {}  # a new window
    with pytest.raises(TypeError, match="'a' must be a number"):
        metrics.add({"a": "high"}, mean_over_ranks=False)
    metrics.add({"a": 1.0}, mean_over_ranks=False)
    with pytest.raises(ValueError, match="one setting per name"):
        metrics.add({"a": 1.0}, mean_over_ranks=True)
