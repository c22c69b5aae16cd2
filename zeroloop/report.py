"""``zeroloop report RUN_DIR [RUN_DIR...]``: a run's curves as one PNG, and a short table.

Reads each run's ``metrics.jsonl`` (the logged training records and the evaluation
records) and draws, over optimizer steps, with the runs overlaid: the training loss with
the eval loss, the learning rate, the gradient norm, samples/s, tokens/s and the fp16 loss
scale. The table has one row per run: steps, first and last logged loss, best eval loss,
median throughput and the skipped steps.

matplotlib comes with the ``report`` extra (``pip install "zeroloop[report]"``); the table
needs nothing.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# (record key, panel title, y scale) of each panel, in reading order.
PANELS = (
    ("loss", "loss (eval dashed)", "linear"),
    ("lr", "learning rate", "linear"),
    ("grad_norm", "gradient norm", "log"),
    ("samples_per_sec", "samples/s", "linear"),
    ("tokens_per_sec", "tokens/s", "linear"),
    ("loss_scale", "fp16 loss scale", "log"),
)


@dataclass
class RunMetrics:
    """One run's records from ``metrics.jsonl``, one per step (the last written wins).

    Attributes:
        name: the run folder's name, used as its label.
        train: training records (with ``loss``), in step order.
        evals: evaluation records (with ``eval_loss``), in step order.
    """

    name: str
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, records: list[dict[str, Any]] | None = None) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key`` where the records hold a number for it."""
        points = [(r["step"], r[key]) for r in (self.train if records is None else records)
                  if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        return [s for s, _ in points], [v for _, v in points]


def read_run(run_dir: str | os.PathLike, metrics_file: str = "metrics.jsonl") -> RunMetrics:
    """The records of one run folder.

    Raises:
        ConfigError: no metrics file in ``run_dir``, or a line that is not JSON.
    """
    path = os.path.join(os.fspath(run_dir), metrics_file)
    if not os.path.isfile(path):
        raise ConfigError([f"{path}: no such file; pass the output_dir of a run (it holds {metrics_file})"],
                          subject="zeroloop report arguments")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ConfigError([f"{path}:{number}: not a JSON line"],
                                  subject="zeroloop report arguments") from None
            if "eval_loss" in record:
                evals[record["step"]] = record
            elif "loss" in record:
                train[record["step"]] = record
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    return RunMetrics(name=name, train=[train[s] for s in sorted(train)], evals=[evals[s] for s in sorted(evals)])


def summary_rows(runs: list[RunMetrics]) -> list[dict[str, Any]]:
    """One row per run: what a reader wants before looking at curves."""
    rows = []
    for run in runs:
        _, losses = run.series("loss")
        _, eval_losses = run.series("eval_loss", run.evals)
        _, throughput = run.series("samples_per_sec")
        last = run.train[-1] if run.train else {}
        rows.append({"run": run.name, "steps": last.get("step"), "first loss": losses[0] if losses else None,
                     "last loss": losses[-1] if losses else None,
                     "best eval loss": min(eval_losses) if eval_losses else None,
                     "samples/s (median)": statistics.median(throughput) if throughput else None,
                     "skipped steps": last.get("skipped_steps", 0)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned plain-text table."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_runs(runs: list[RunMetrics], path: str | os.PathLike) -> str:
    """Draw the panels of :data:`PANELS` for every run into a PNG at ``path``.

    Returns:
        The path written.

    Raises:
        ConfigError: matplotlib is not installed (with the extra to install).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(["the plot needs matplotlib: pip install \"zeroloop[report]\""],
                          subject="zeroloop report") from None
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, scale) in zip(axes.flat, PANELS):
        drawn = False
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, color=color, label=run.name)
                drawn = True
            if key == "loss":
                eval_steps, eval_values = run.series("eval_loss", run.evals)
                if eval_steps:
                    ax.plot(eval_steps, eval_values, color=color, linestyle="--", marker="o", markersize=3,
                            label=f"{run.name} (eval)")
                    drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.set_yscale(scale)
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged" + (" (not fp16)" if key == "loss_scale" else ""),
                    ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(", ".join(run.name for run in runs))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def default_output(run_dirs: list[str]) -> str:
    """``RUN_DIR/report.png`` for one run, ``report.png`` here for several."""
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "report.png")
    return "report.png"


def report(run_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None,
           plot: bool = True) -> tuple[str, str | None]:
    """Read the runs, write the PNG and return the table.

    Args:
        run_dirs: the runs' output folders (each holds ``metrics.jsonl``).
        out: the PNG's path (default: :func:`default_output`).
        plot: False: only the table (no matplotlib needed).

    Returns:
        ``(table, png path or None)``.

    Raises:
        ConfigError: a folder without metrics, or matplotlib missing for the plot.
    """
    dirs = [os.fspath(d) for d in run_dirs]
    runs = [read_run(d) for d in dirs]
    if len({run.name for run in runs}) < len(runs):  # same folder names: label by the paths given
        for run, d in zip(runs, dirs):
            run.name = os.path.normpath(d)
    table = format_table(summary_rows(runs))
    png = plot_runs(runs, out or default_output(dirs)) if plot else None
    return table, png
