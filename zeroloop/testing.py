"""The kit for unit-testing a ``TrainerLoop`` (zeroloop's own tests use it too).

- :func:`run_ranks` runs a function on N ranks from pytest, no launcher needed: one GPU
  each when there are enough GPUs, else CPU ranks with gloo (:func:`choose_rank_device`).
- :func:`single_process` sets up (and restores) the environment of a one-rank run, on
  DeepSpeed's accelerator (the GPU when there is one).
- :func:`fp16_on_cpu` lets DeepSpeed's fp16 paths run on a CPU (tests only).
- :func:`tiny_config` returns a small, valid DeepSpeed config.
- :func:`full_parameters` gathers full parameters, also under ZeRO-3.
- :func:`engine_loop` is the hand-written ``engine.backward/step`` loop, and
  :func:`assert_matches_engine_loop` checks a ``TrainerLoop`` (subclass) against it.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .errors import RankFailure, RankTimeout
from .ops import clear_stale_build_locks
from .runtime import SHM_PREFIX, available_cores, free_port, log

RANK_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "OMP_NUM_THREADS")
# Seconds the other ranks get to finish once one rank has failed (they usually wait in a
# collective for the failed one and never will).
FAILURE_GRACE_S = 3.0


@dataclass(frozen=True)
class RankDevice:
    """Where :func:`run_ranks` puts its ranks, and why.

    Attributes:
        kind: ``"cuda"`` (one GPU per rank, NCCL) or ``"cpu"`` (gloo).
        reason: one line saying why, e.g. "1 GPU for 2 ranks".
        gpus: the GPUs the calling process sees.
    """

    kind: str
    reason: str
    gpus: int = 0

    def rank_env(self) -> dict[str, str]:
        """The variables each rank gets so that DeepSpeed picks this device.

        CPU ranks also hide the GPUs: DeepSpeed, torch and the loop's memory check then
        all agree that the rank has none. On a machine with GPUs they build DeepSpeed's
        ops in their own folder (:func:`cpu_ops_dir`).
        """
        if self.kind == "cpu":
            env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
            if self.gpus:
                env["TORCH_EXTENSIONS_DIR"] = cpu_ops_dir()
            return env
        return {"DS_ACCELERATOR": "cuda"}


def cpu_ops_dir() -> str:
    """Where CPU ranks on a GPU machine build DeepSpeed's C++ ops: ``cpu-ranks`` under
    ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). DeepSpeed names its CPU
    and its CUDA Adam op alike (``fused_adam``), so in one folder each build would replace
    the other, a rebuild of a minute or more every time the device changes."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                 "torch_extensions")
    return os.path.join(base, "cpu-ranks")


class RankResults(list):
    """:func:`run_ranks`' return value: each rank's result in rank order (a list), and
    ``device``, the :class:`RankDevice` they ran on."""

    def __init__(self, results: list[Any], device: RankDevice):
        super().__init__(results)
        self.device = device


DEVICES = ("cpu", "cuda")


def visible_gpus() -> int:
    """CUDA devices this process may use; 0 without CUDA. (Does not initialise CUDA.)"""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_rank_device(world_size: int, device: str | None = None) -> RankDevice:
    """Where ``world_size`` ranks run: the one place :func:`run_ranks` decides it.

    Args:
        world_size: the number of ranks.
        device: ``"cuda"`` (one GPU per rank, or an error), ``"cpu"``, or None: GPUs when
            there is one for every rank and ``DS_ACCELERATOR`` does not say ``cpu``, else
            CPU ranks (a one-GPU machine runs 2 ranks on its CPU).

    Returns:
        A :class:`RankDevice`.

    Raises:
        ValueError: an unknown ``device``, or ``"cuda"`` with fewer GPUs than ranks.
    """
    if device is not None and device not in DEVICES:
        raise ValueError(f"device: must be one of {', '.join(DEVICES)} or None (choose), got {device!r}")
    gpus = visible_gpus()
    if device == "cuda" and gpus < world_size:
        raise ValueError(f"device='cuda': {world_size} ranks need {world_size} GPUs, this process sees {gpus}; "
                         "use device='cpu' (gloo) or device=None (GPUs when there are enough, else the CPU)")
    if device is not None:
        return RankDevice(device, f"device={device!r} was asked for", gpus)
    accelerator = os.environ.get("DS_ACCELERATOR")
    if accelerator == "cpu":
        return RankDevice("cpu", "DS_ACCELERATOR=cpu", gpus)
    if gpus == 0:
        return RankDevice("cpu", "no GPU", gpus)
    if gpus < world_size:
        return RankDevice("cpu", f"{gpus} GPU{'s' * (gpus != 1)} for {world_size} ranks; "
                                 f"device='cuda' needs {world_size}", gpus)
    return RankDevice("cuda", f"{gpus} GPUs for {world_size} ranks", gpus)


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 300.0,
              env: dict[str, str] | None = None, device: str | None = None) -> RankResults:
    """Run ``fn(rank, *args)`` on ``world_size`` fresh processes and collect the results.

    Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, a free MASTER_PORT and its
    share of the cores in OMP_NUM_THREADS, so ``TrainerLoop`` and ``deepspeed.initialize``
    work inside ``fn`` as under a launcher. ``fn`` must be picklable (a module-level
    function), as must its arguments and return value.

    The ranks run on one GPU each (NCCL) when the machine has a GPU for every rank, else
    on the CPU with gloo, their GPUs hidden (:func:`choose_rank_device`); the choice is
    logged and returned as ``results.device``.

    Args:
        fn: the function each rank runs.
        world_size: the number of ranks.
        *args: passed to ``fn`` after the rank.
        timeout: seconds for the whole run; ranks still running then are killed.
        env: extra environment variables for every rank (MASTER_PORT here picks the port).
        device: ``"cpu"``, ``"cuda"`` or None (choose); see :func:`choose_rank_device`.

    Returns:
        Each rank's return value, in rank order (a list with ``.device``).

    Raises:
        ValueError: ``device`` is unknown, or ``"cuda"`` with fewer GPUs than ranks.
        RankFailure: a rank raised (its traceback and rank number are in the message) or
            exited without reporting.
        RankTimeout: a rank hung past ``timeout``.

    Whatever happens, every rank process is gone on return and the run's /dev/shm
    buffers are removed.
    """
    placement = choose_rank_device(world_size, device)
    log.info("run_ranks: %d %s ranks (%s)", world_size, "GPU" if placement.kind == "cuda" else "CPU",
             placement.reason)
    ctx = multiprocessing.get_context("spawn")
    env = dict(env or {})
    port = int(env.pop("MASTER_PORT", 0)) or free_port()
    threads = max(1, available_cores() // world_size)
    extensions_dir = {**placement.rank_env(), **env}.get("TORCH_EXTENSIONS_DIR")
    clear_stale_build_locks(extensions_dir)  # ranks that call deepspeed.init_distributed themselves would wait forever
    conns, procs = [], []
    try:
        for rank in range(world_size):
            receiver, sender = ctx.Pipe(duplex=False)
            rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads), **placement.rank_env(), **env}
            proc = ctx.Process(target=_rank_main, args=(fn, rank, rank_env, args, sender),
                               name=f"zeroloop-rank-{rank}")  # not daemonic: DataLoader workers may start
            # The device variables must be there when the rank starts: unpickling fn
            # imports its module (and DeepSpeed, which picks its accelerator on import).
            with _environment(placement.rank_env()):
                proc.start()
            sender.close()
            conns.append(receiver)
            procs.append(proc)
        return RankResults(_collect(conns, procs, timeout), placement)
    finally:
        _stop(procs)
        for conn in conns:
            conn.close()
        remove_shm_buffers(port)


@contextlib.contextmanager
def _environment(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (a spawned process inherits them)."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        _restore_environment(saved)


def _restore_environment(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _collect(conns, procs, timeout: float) -> list[Any]:
    results: dict[int, Any] = {}
    pending = dict(enumerate(conns))
    deadline = time.monotonic() + timeout
    failure: RankFailure | None = None
    while pending:
        left = deadline - time.monotonic()
        if failure is not None:
            left = min(left, FAILURE_GRACE_S)
        ready = multiprocessing.connection.wait(list(pending.values()), timeout=max(0.0, left))
        if not ready:
            break
        for rank, conn in list(pending.items()):
            if conn not in ready:
                continue
            del pending[rank]
            status, payload = _receive(conn, procs[rank])
            if status == "ok":
                results[rank] = payload
            elif failure is None:
                failure = RankFailure(rank, f"rank {rank} of {len(procs)} failed", payload)
    if failure is not None:
        raise failure
    if pending:
        hung = sorted(pending)
        raise RankTimeout(hung[0], f"rank(s) {hung} did not finish within {timeout:g} s and were killed; "
                                   "a rank waiting forever in a collective usually means another rank "
                                   "took a different number of steps")
    return [results[rank] for rank in range(len(procs))]


def _receive(conn, proc) -> tuple[str, Any]:
    try:
        return pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        proc.join(timeout=5)
        return "error", f"the process exited with code {proc.exitcode} without reporting a result"


def _stop(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=10)


def _rank_main(fn, rank: int, env: dict[str, str], args: tuple, conn) -> None:
    """Entry point of a rank process: run ``fn``, report, tear down, leave at once."""
    _die_with_parent()
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    code = 0
    try:
        message = ("ok", fn(rank, *args))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank's traceback
        message, code = ("error", traceback.format_exc()), 1
    try:
        # Plain pickle copies tensors by value; multiprocessing's own pickler would share
        # them through file descriptors that die with this process.
        payload = pickle.dumps(message)
    except Exception:  # noqa: BLE001 - an unpicklable return value
        payload, code = pickle.dumps(("error", traceback.format_exc())), 1
    conn.send_bytes(payload)
    conn.close()
    _destroy_process_group()
    # Skip interpreter finalization: gloo's threads can abort it ("terminate called
    # without an active exception"), and everything worth keeping has been sent.
    os._exit(code)


def _die_with_parent() -> None:
    """Have the kernel kill this rank when the test process dies (ranks are not daemonic,
    so that DataLoader workers can start, and must not outlive a killed pytest)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _destroy_process_group() -> None:
    """Destroy the default process group, through DeepSpeed when it is loaded so that it
    also drops its cached sub-groups (a later engine would otherwise find stale ones)."""
    try:
        if "deepspeed" in sys.modules:
            import deepspeed.comm as dist
        else:
            import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def remove_shm_buffers(port: int | str) -> list[str]:
    """Remove the DeepSpeed /dev/shm all-reduce buffers of the run on ``port``.

    Only a run that owns ``port`` may call this (the buffer names carry the port).

    Returns:
        The paths removed.
    """
    removed = []
    for path in glob.glob(f"{SHM_PREFIX}_{os.getuid()}_*_{int(port)}_*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def single_process(port: int | None = None) -> Iterator[None]:
    """Make this process a one-rank run for the duration; restore everything after.

    Sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (a free port unless given),
    and on exit destroys the process group if one was started, removes the run's /dev/shm
    buffers and restores the previous environment.

    The run uses DeepSpeed's accelerator, as any script would: the first GPU when there is
    one, else the CPU (``DS_ACCELERATOR=cpu``, set before DeepSpeed is first imported,
    keeps it on the CPU). Build test tensors on ``engine.device``.
    """
    saved = {key: os.environ.get(key) for key in RANK_ENV_KEYS}
    port = port or free_port()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("LOCAL_SIZE", None)
    try:
        yield
    finally:
        _destroy_process_group()
        remove_shm_buffers(port)
        _restore_environment(saved)


@contextlib.contextmanager
def fp16_on_cpu() -> Iterator[None]:
    """Declare fp16 supported by DeepSpeed's CPU accelerator for the duration.

    DeepSpeed refuses fp16 on a CPU ("Type fp16 is not supported on your device"), yet its
    fp16 paths (FP16_Optimizer, ZeRO fp16, dynamic loss scaling) run there once declared
    supported. This is the documented way to test fp16 loss scaling on a CPU; it is for
    tests only, and restored on exit.
    """
    from deepspeed.accelerator import get_accelerator

    cls = type(get_accelerator())
    saved = cls.__dict__.get("is_fp16_supported")
    cls.is_fp16_supported = lambda self: True
    try:
        yield
    finally:
        if saved is None:
            del cls.is_fp16_supported
        else:
            cls.is_fp16_supported = saved


def tiny_config(stage: int = 0, precision: str = "fp32", micro: int = 2, ga: int = 1,
                world_size: int | None = None, lr: float = 1e-3, clip: float = 0.0) -> dict:
    """A small valid DeepSpeed config for tests: Adam (no weight decay), no scheduler.

    Args:
        stage: ZeRO stage 0-3.
        precision: "fp32", "bf16" or "fp16" (fp16 with a dynamic loss scale).
        micro: train_micro_batch_size_per_gpu.
        ga: gradient_accumulation_steps.
        world_size: when given, train_batch_size is written out (micro * ga * world_size).
        lr: the learning rate.
        clip: gradient_clipping (0 is off).
    """
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": clip,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "weight_decay": 0.0}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1_000_000,
    }
    if world_size is not None:
        config["train_batch_size"] = micro * ga * world_size
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    elif precision != "fp32":
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return config


def full_parameters(engine_or_module) -> dict[str, torch.Tensor]:
    """Every parameter as a full fp32 CPU tensor, keyed by name; gathers ZeRO-3 partitions.

    Collective under ZeRO-3: call it on every rank.
    """
    import deepspeed

    module = getattr(engine_or_module, "module", engine_or_module)
    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {name: p.detach().float().cpu().clone() for name, p in params}


@dataclass
class EngineLoopResult:
    """What a loop computed on this rank.

    Attributes:
        micro_losses: the loss of every micro-batch, in order.
        weights: the final parameters (full, fp32, CPU), by name.
    """

    micro_losses: list[float]
    weights: dict[str, torch.Tensor]


def engine_loop(model: torch.nn.Module, config: dict, train_data: Any, steps: int, *, seed: int = 0,
                loss: Callable[[Any, Any], torch.Tensor] | None = None) -> EngineLoopResult:
    """The loop users write by hand, as the reference for a ``TrainerLoop``.

    ``deepspeed.initialize``, then ``engine.backward`` / ``engine.step`` for ``steps``
    optimizer steps, on the data order ``TrainerLoop`` promises: per epoch a permutation
    seeded by ``seed + epoch``, cut into global micro-batches of micro-batch x ranks
    samples, of which rank r takes the r-th slice (the ragged tail dropped). It uses torch
    and DeepSpeed only, none of zeroloop's own helpers, so that a bug in one of them cannot
    hide by showing on both sides of a comparison. Needs a process group
    (``deepspeed.init_distributed()``); every rank calls it.

    Args:
        model: a freshly built model, initialized like the one given to the loop.
        config: a DeepSpeed config with numbers, not ``"auto"``, for the batch sizes.
        train_data: a map-style dataset (or list) of samples.
        steps: optimizer steps.
        seed: the loop's seed.
        loss: ``loss(engine, batch) -> tensor``; default: the model's scalar output, or its
            ``.loss`` / ``["loss"]``.

    Returns:
        This rank's micro-batch losses and final weights.
    """
    import random

    import deepspeed
    import numpy as np
    import torch.distributed as dist
    from torch.utils.data import default_collate

    world, rank = dist.get_world_size(), dist.get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    micro = engine.train_micro_batch_size_per_gpu()
    group = micro * world
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    loss = loss or _reference_loss
    losses, step, epoch = [], 0, 0
    while step < steps:
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order) // group * group, group):
            indices = order[start + rank * micro:start + (rank + 1) * micro]
            batch = _to_engine(default_collate([train_data[i] for i in indices]), engine.device, dtype)
            value = loss(engine, batch)
            engine.backward(value)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            losses.append(value.item())
            step += boundary
            if step == steps:
                break
        epoch += 1
    weights = full_parameters(engine)
    engine.destroy()
    return EngineLoopResult(losses, weights)


def _to_engine(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """The reference loop's own move to the engine: floats in the compute dtype."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, dtype) if dtype is not None and batch.is_floating_point() else batch.to(device)
    if isinstance(batch, dict):
        return {key: _to_engine(value, device, dtype) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_engine(value, device, dtype) for value in batch)
    return batch


def _reference_loss(engine, batch: Any) -> torch.Tensor:
    output = engine(**batch) if isinstance(batch, dict) else engine(*batch)
    if isinstance(output, torch.Tensor):
        return output
    return output["loss"] if isinstance(output, dict) else output.loss


def assert_matches_engine_loop(make_loop: Callable[[torch.nn.Module], Any], make_model: Callable[[], torch.nn.Module],
                               config: dict, train_data: Any, steps: int, *, seed: int = 0, rel: float = 1e-6,
                               loss: Callable[[Any, Any], torch.Tensor] | None = None) -> EngineLoopResult:
    """Assert a ``TrainerLoop`` trains exactly as the hand-written :func:`engine_loop`.

    Runs the reference loop, then ``make_loop(make_model()).train()`` for ``steps``
    optimizer steps, and compares every micro-batch loss and every final weight on this
    rank. Call it on every rank (inside :func:`run_ranks`, or :func:`single_process`).

    Args:
        make_loop: builds the loop around the model it is given (with ``max_steps=steps``,
            the same ``config``, ``train_data`` and ``seed``).
        make_model: builds identically initialized models (seed inside it).
        config, train_data, steps, seed, loss: as for :func:`engine_loop`.
        rel: relative tolerance; 0 asks for bit-identical results.

    Returns:
        The reference result.

    Raises:
        AssertionError: naming the first micro-batch or parameter that differs.
    """
    import deepspeed

    deepspeed.init_distributed()  # one group for both loops; left for the caller to end
    reference = engine_loop(make_model(), config, train_data, steps, seed=seed, loss=loss)
    loop = make_loop(make_model())
    recorded = _record(loop)
    loop.train()
    _compare_losses(reference.micro_losses, recorded.micro_losses, rel)
    _compare_weights(reference.weights, recorded.weights, rel)
    return reference


def _record(loop) -> EngineLoopResult:
    """Wrap the loop instance's compute_loss and on_train_end to keep losses and weights."""
    result = EngineLoopResult([], {})
    compute_loss, on_train_end = loop.compute_loss, loop.on_train_end

    def recording_loss(batch):
        value = compute_loss(batch)
        result.micro_losses.append(value.item())
        return value

    def recording_end(summary):
        result.weights.update(full_parameters(loop.engine))
        on_train_end(summary)

    loop.compute_loss, loop.on_train_end = recording_loss, recording_end
    return result


def _compare_losses(expected: list[float], actual: list[float], rel: float) -> None:
    if len(expected) != len(actual):
        raise AssertionError(f"the loop ran {len(actual)} micro-batches, the engine loop {len(expected)}")
    for index, (want, got) in enumerate(zip(expected, actual)):
        if abs(want - got) > rel * max(abs(want), abs(got)):
            raise AssertionError(f"micro-batch {index}: loop loss {got!r} != engine-loop loss {want!r} "
                                 f"(relative tolerance {rel:g})")


def _compare_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], rel: float) -> None:
    for name, want in expected.items():
        got = actual[name]
        if rel == 0:
            ok = torch.equal(want, got)
        else:
            ok = torch.allclose(got, want, rtol=rel, atol=rel * float(want.abs().max().clamp(min=1e-12)))
        if not ok:
            diff = (got - want).abs().max().item()
            raise AssertionError(f"parameter {name!r} differs from the engine loop's by up to {diff:.3g}")
