"""The same script under plain python, the deepspeed launcher and torchrun; the main job.

Each run must exit 0 on every rank, abort nowhere, and leave nothing in /dev/shm.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zeroloop import consolidate
from zeroloop.consolidate import load_state_dict
from zeroloop.runtime import available_cores, free_port
from zeroloop.testing import choose_rank_device

pytestmark = pytest.mark.launcher
SCRIPT = Path(__file__).parent / "scripts" / "tiny_train.py"
TIMEOUT_S = 300


def launcher(name):
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed beside {sys.executable}")
    return found


def run(command, port, world_size=1):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "OMP_NUM_THREADS")}
    # The launchers start one rank per GPU; with fewer GPUs than ranks, CPU ranks (as run_ranks).
    env.update(choose_rank_device(world_size).rank_env())
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "terminate called" not in output and "Traceback" not in output, output[-4000:]
    leftovers = [p for p in os.listdir("/dev/shm") if p.endswith(f"_{port}_0") or p.endswith(f"_{port}_1")]
    assert not leftovers, leftovers
    return output


def reports(out, world_size):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def test_plain_python_runs_one_rank(tmp_path):
    run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], port=None)
    (report,) = reports(tmp_path, 1)
    assert report["world_size"] == 1 and len(report["losses"]) == 4


def test_deepspeed_and_torchrun_give_the_same_two_rank_run(tmp_path):
    port = free_port()
    ds_out, tr_out = tmp_path / "deepspeed", tmp_path / "torchrun"
    output = run([launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(SCRIPT),
                  "--out", str(ds_out)], port, world_size=2)
    port2 = free_port()
    run([launcher("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(port2), str(SCRIPT), "--out", str(tr_out)], port2, world_size=2)
    ds, tr = reports(ds_out, 2), reports(tr_out, 2)
    assert all(r["world_size"] == 2 for r in ds + tr)
    assert ds[0]["losses"] == ds[1]["losses"] == tr[0]["losses"] == tr[1]["losses"]
    # The deepspeed launcher leaves OMP_NUM_THREADS unset; the loop splits the cores.
    assert ds[0]["omp_num_threads"] == str(max(1, available_cores() // 2))
    assert "OMP_NUM_THREADS was unset" in output


def foreign_lines(output):
    """Output lines zeroloop did not print (its log lines, the progress bar, the JSON report)."""
    lines = [part.strip() for line in output.splitlines() for part in line.split("\r")]
    return [line for line in lines if line and not line.startswith(("[zeroloop]", "train:", '{"steps"'))]


def test_main_job_under_deepspeed(tmp_path):
    port = free_port()
    out = tmp_path / "gpt"
    # -q as in the README: the launcher's own INFO lines (about 10) stay out.
    output = run([launcher("deepspeed"), "-q", "--num_gpus", "2", "--master_port", str(port), "--module", "zeroloop",
                  "train", "--steps", "6", "--max-bytes", "200000", "--seq-len", "64", "--log-every", "2",
                  "--eval-every", "3", "--warmup", "2", "--save-every", "3", "--output-dir", str(out)], port,
                 world_size=2)
    (report_line,) = [line for line in output.splitlines() if line.startswith('{"steps"')]  # rank 0 only
    report = json.loads(report_line)
    assert report["steps"] == 6 and report["final_loss"] < report["first_logged_loss"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    resolved = json.loads((out / "ds_config.resolved.json").read_text())
    assert resolved["zero_optimization"]["stage"] == 2 and resolved["train_batch_size"] == 32
    # Quiet: at most DeepSpeed's accelerator notice from the launcher, its child and rank 0;
    # each zeroloop message once, not once per rank (checkpoints at steps 3 and 6).
    assert len(foreign_lines(output)) <= 3, foreign_lines(output)
    assert output.count("checkpoint saved") == 2

    # Checkpoints every 3 steps; the final weights, written by the loop, equal what
    # consolidating the last checkpoint gives.
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step6"
    consolidate(str(out / "checkpoints"), str(tmp_path / "consolidated"), progress=False)
    final, consolidated = load_state_dict(out / "final"), load_state_dict(tmp_path / "consolidated")
    assert final.keys() == consolidated.keys() and "lm_head.weight" in final
    for name in final:
        assert torch.equal(final[name], consolidated[name]), name


@pytest.mark.parametrize("flag", ["--config", "--deepspeed", "--deepspeed_config"])
def test_train_takes_the_config_under_deepspeeds_names(flag):
    from zeroloop.cli import build_parser

    # As the deepspeed launcher passes it: --local_rank first, then the script's own arguments.
    args = build_parser().parse_args(["--local_rank=1", "train", flag, "ds_config.json", "--steps", "3"])
    assert args.config == "ds_config.json" and args.steps == 3
