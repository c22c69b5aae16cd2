"""zeroloop.testing itself: failures and hangs are reported and leave nothing behind."""

import os
import socket
import time

import psutil
import pytest
import torch

import zeroloop.testing
from zeroloop.runtime import available_cores, free_port
from zeroloop.testing import (RankDevice, RankFailure, RankTimeout, choose_rank_device, fp16_on_cpu,
                              remove_shm_buffers, run_ranks, single_process, tiny_config)


def returns_rank_and_env(rank):
    return rank, os.environ["WORLD_SIZE"], os.environ["OMP_NUM_THREADS"]


def raises_on_rank_1(rank):
    import deepspeed

    deepspeed.init_distributed()
    if rank == 1:
        raise ValueError("rank one is broken")
    import torch.distributed as dist

    dist.barrier()  # rank 0 waits here for a peer that never comes


def hangs_on_rank_1(rank, shm_port):
    if rank == 1:
        # Stand in for a DeepSpeed buffer the hung rank created, to check the clean-up.
        open(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{shm_port}_1", "w").close()
        time.sleep(3600)
    return rank


def children_of_this_process():
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]


def port_is_free(port):
    """Nothing listens on it (a closed connection may linger in TIME_WAIT, as after any run)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.multirank
def test_results_in_rank_order_with_rank_env():
    threads = str(max(1, available_cores() // 2))
    assert run_ranks(returns_rank_and_env, 2) == [(0, "2", threads), (1, "2", threads)]


@pytest.mark.multirank
def test_a_raising_rank_is_reported_with_its_traceback_and_nothing_is_left():
    port = free_port()
    with pytest.raises(RankFailure) as info:
        run_ranks(raises_on_rank_1, 2, timeout=120, env={"MASTER_PORT": str(port)})
    assert info.value.rank == 1
    message = str(info.value)
    assert "rank 1 of 2 failed" in message and "ValueError: rank one is broken" in message
    assert "raises_on_rank_1" in message  # the remote traceback names the function
    assert children_of_this_process() == []
    assert port_is_free(port)


@pytest.mark.multirank
def test_a_hanging_rank_is_killed_at_the_timeout_and_cleaned_up():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RankTimeout, match=r"rank\(s\) \[1\] did not finish within 20 s"):
        run_ranks(hangs_on_rank_1, 2, port, timeout=20, env={"MASTER_PORT": str(port)})
    assert time.monotonic() - started < 60
    assert children_of_this_process() == []
    assert not [f for f in os.listdir("/dev/shm") if f"_{port}_" in f]
    assert port_is_free(port)


def reports_its_device(rank):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed()
    return (get_accelerator().device_name(), dist.get_backend(), torch.cuda.is_available(),
            os.environ["DS_ACCELERATOR"])


@pytest.mark.parametrize("gpus, accelerator, device, kind, reason", [
    (0, None, None, "cpu", "no GPU"),
    (1, None, None, "cpu", "1 GPU for 2 ranks; device='cuda' needs 2"),
    (1, "cuda", None, "cpu", "1 GPU for 2 ranks"),
    (2, None, None, "cuda", "2 GPUs for 2 ranks"),
    (4, "cpu", None, "cpu", "DS_ACCELERATOR=cpu"),
    (4, None, "cpu", "cpu", "device='cpu' was asked for"),
    (2, "cpu", "cuda", "cuda", "device='cuda' was asked for"),
])
def test_the_kit_chooses_gpus_only_when_there_is_one_per_rank(monkeypatch, gpus, accelerator, device, kind, reason):
    monkeypatch.setattr(zeroloop.testing, "visible_gpus", lambda: gpus)
    if accelerator is None:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    else:
        monkeypatch.setenv("DS_ACCELERATOR", accelerator)
    chosen = choose_rank_device(2, device)
    assert chosen.kind == kind and reason in chosen.reason


def test_the_kit_refuses_a_device_it_cannot_give(monkeypatch):
    monkeypatch.setattr(zeroloop.testing, "visible_gpus", lambda: 1)
    with pytest.raises(ValueError, match="2 ranks need 2 GPUs, this process sees 1; use device='cpu'"):
        choose_rank_device(2, "cuda")
    with pytest.raises(ValueError, match="device: must be one of cpu, cuda"):
        choose_rank_device(2, "tpu")
    assert RankDevice("cpu", "").rank_env() == {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    assert RankDevice("cuda", "", gpus=2).rank_env() == {"DS_ACCELERATOR": "cuda"}


def test_cpu_ranks_beside_gpus_build_deepspeed_ops_in_their_own_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert RankDevice("cpu", "", gpus=1).rank_env()["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "cpu-ranks")
    assert "TORCH_EXTENSIONS_DIR" not in RankDevice("cpu", "", gpus=0).rank_env()


@pytest.mark.multirank
def test_one_gpu_and_two_ranks_run_as_cpu_ranks_with_gloo(monkeypatch, caplog):
    """Faked at the point where the kit decides: this process 'sees' one GPU and
    DS_ACCELERATOR=cuda. Ranks that inherited cuda would fail to start (no GPU for rank 1,
    no CUDA at all on a CPU machine)."""
    monkeypatch.setattr(zeroloop.testing, "visible_gpus", lambda: 1)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with caplog.at_level("INFO", logger="zeroloop"):
        results = run_ranks(reports_its_device, 2)
    assert results == [("cpu", "gloo", False, "cpu")] * 2
    assert results.device == RankDevice("cpu", "1 GPU for 2 ranks; device='cuda' needs 2", gpus=1)
    assert "run_ranks: 2 CPU ranks (1 GPU for 2 ranks" in caplog.text
    assert os.environ["DS_ACCELERATOR"] == "cuda"  # the parent's environment is left as it was


def test_single_process_restores_the_environment():
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    with single_process():
        assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
    assert {k: os.environ.get(k) for k in before} == before


def test_fp16_on_cpu_is_restored():
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    original = accelerator.is_fp16_supported()
    with fp16_on_cpu():
        assert accelerator.is_fp16_supported() is True
    assert accelerator.is_fp16_supported() == original


def test_tiny_config_is_valid_and_refuses_unknown_precision():
    from zeroloop import resolve_config

    for stage in range(4):
        for precision in ("fp32", "bf16", "fp16"):
            resolve_config(tiny_config(stage=stage, precision=precision, world_size=2), world_size=2)
    with pytest.raises(ValueError, match="precision"):
        tiny_config(precision="fp8")


def test_remove_shm_buffers_only_touches_its_port():
    mine, other = free_port(), free_port()
    paths = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{p}_0" for p in (mine, other)]
    for path in paths:
        open(path, "w").close()
    try:
        assert remove_shm_buffers(mine) == [paths[0]]
        assert os.path.exists(paths[1])
    finally:
        remove_shm_buffers(other)


def test_pytest_plugin_fixtures(zeroloop_single_process, zeroloop_tiny_config, zeroloop_fp16_on_cpu):
    """The fixtures come from the plugin the package registers (entry point pytest11)."""
    from deepspeed.accelerator import get_accelerator

    assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
    assert zeroloop_tiny_config(stage=3, micro=4)["zero_optimization"] == {"stage": 3}
    assert get_accelerator().is_fp16_supported() is True
