"""Each rank's micro-batches, whatever kind of data the user brings.

What ``train_data`` / ``eval_data`` may be, and what zeroloop does with it on N ranks:

- a map-style ``Dataset``, or a sized indexable sequence of samples (a ``list`` or ``tuple``
  of dicts, a tensor): batched by zeroloop at the configured micro-batch size;
- a ``DataLoader``: re-sharded: its dataset is batched by zeroloop, keeping the loader's
  ``collate_fn``, workers, pinning, worker init and its shuffle choice (or its sampler's
  order); its ``batch_size`` must agree with the config;
- an ``IterableDataset`` of samples (or a ``DataLoader`` over one): every rank reads the
  stream and keeps its own samples, split further between loader workers;
- :class:`PerRankBatches`: this rank's own ready micro-batches, used as they come;
- any other iterable of ready batches (a generator): one rank only, where its meaning is
  plain; on several ranks it must say it is per-rank (:class:`PerRankBatches`).

The order of an epoch is global and does not depend on the world size: a permutation per
(seed, epoch) (or the stream's own order), cut into global micro-batches of
``micro_batch_size x world_size`` samples, of which rank r takes the r-th slice. So 2 ranks
x 4 and 1 rank x 8 train on the same samples at every optimizer step, and a position in
the epoch is a count of samples that means the same thing on any number of ranks. Training
drops a ragged tail (every rank takes the same number of steps); evaluation keeps it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable

import torch
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler, default_collate, get_worker_info)

from .errors import ConfigError

log = logging.getLogger("zeroloop")


class PerRankBatches:
    """Marks ``batches`` as this rank's own ready micro-batches.

    zeroloop then neither splits nor batches them: each rank iterates its own. Use it for
    data already sharded per rank (e.g. a ``DataLoader`` over ``split_dataset_by_node``).
    Every rank must yield micro-batches of the configured size; when one rank runs out,
    every rank stops (one small all-reduce per micro-batch keeps them in step).

    Args:
        batches: an iterable of batches; re-iterated each epoch when it can be.
    """

    def __init__(self, batches: Iterable):
        if not isinstance(batches, Iterable):
            raise TypeError(f"PerRankBatches needs an iterable of batches, got {type(batches).__name__}")
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


# --- the global order ---------------------------------------------------------------------


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's order of ``size`` indices: a permutation seeded by ``seed + epoch``
    (``DistributedSampler``'s rule) or, without shuffling, ``0..size-1``."""
    if not shuffle:
        return list(range(size))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(size, generator=generator).tolist()


def rank_slice(group: Sequence, rank: int, world_size: int, micro_batch_size: int) -> Sequence:
    """Rank ``rank``'s part of one global micro-batch: the r-th slice of ``micro_batch_size``
    when the group is full; a near-even split of a ragged tail (evaluation)."""
    if len(group) == micro_batch_size * world_size:
        return group[rank * micro_batch_size:(rank + 1) * micro_batch_size]
    base, extra = divmod(len(group), world_size)
    start = rank * base + min(rank, extra)
    return group[start:start + base + (rank < extra)]


class GlobalBatchSampler(Sampler):
    """This rank's micro-batches of indices, cut from the epoch's global order.

    Args:
        size: samples in the dataset (used when ``order_source`` is None).
        micro_batch_size: samples per rank per micro-batch.
        rank, world_size: this rank's place among the data-parallel ranks.
        seed: the shuffle seed (with the epoch, see :func:`epoch_order`).
        shuffle: permute each epoch, or keep the dataset's order.
        drop_tail: drop the last global micro-batch when it is not full (training).
        order_source: a sampler whose iteration gives the epoch's order instead (a user's
            ``WeightedRandomSampler``, say); its ``set_epoch`` is called when it has one.
    """

    def __init__(self, size: int, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, drop_tail: bool, order_source: Iterable[int] | None = None):
        self.size = size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_tail = drop_tail
        self.order_source = order_source
        self.epoch = 0
        self.skip = 0

    @property
    def group(self) -> int:
        """Samples per global micro-batch."""
        return self.micro_batch_size * self.world_size

    def set_position(self, epoch: int, skip_samples: int) -> None:
        """Start the next pass at global sample ``skip_samples`` of ``epoch``'s order.

        Raises:
            ValueError: ``skip_samples`` is negative or not a whole number of global micro-batches.
        """
        if skip_samples < 0 or skip_samples % self.group:
            raise ValueError(f"skip_samples: must be a multiple of {self.group} (micro-batch x ranks) and "
                             f">= 0, got {skip_samples}")
        self.epoch, self.skip = epoch, skip_samples

    def order(self) -> list[int]:
        if self.order_source is None:
            return epoch_order(self.size, self.seed, self.epoch, self.shuffle)
        if hasattr(self.order_source, "set_epoch"):
            self.order_source.set_epoch(self.epoch)
        return [int(i) for i in self.order_source]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        end = len(order) if not self.drop_tail else len(order) // self.group * self.group
        for start in range(self.skip, end, self.group):
            part = rank_slice(order[start:start + self.group], self.rank, self.world_size, self.micro_batch_size)
            if len(part):
                yield list(part)

    def __len__(self) -> int:
        """Micro-batches of this rank in a whole epoch."""
        total = len(self.order_source) if self.order_source is not None else self.size  # type: ignore[arg-type]
        full, tail = divmod(total, self.group)
        return full + int(not self.drop_tail and len(rank_slice(range(tail), self.rank, self.world_size,
                                                                self.micro_batch_size)) > 0)


class ShardedStream(IterableDataset):
    """This rank's share of an iterable dataset of samples, split further between loader workers.

    Every rank (and every worker) reads the whole stream, cuts it into global micro-batches
    and keeps its own slice, so that no sample is seen twice; worker w of K keeps the
    rank's micro-batches w, w+K, ..., which the ``DataLoader`` (batch size
    ``micro_batch_size``) hands out round-robin, that is in order. A source that splits
    itself by ``get_worker_info()`` is shown no worker, so it yields the whole stream too.
    """

    def __init__(self, source: Iterable, *, micro_batch_size: int, rank: int, world_size: int, drop_tail: bool):
        self.source = source
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_tail = drop_tail
        self.epoch = 0
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.epoch)
        samples = whole_stream(self.source)
        group = self.micro_batch_size * self.world_size
        if self.skip and next(itertools.islice(samples, self.skip - 1, None), _END) is _END:
            return  # the stream ended inside the skipped part
        for index in itertools.count():
            chunk = list(itertools.islice(samples, group))
            if not chunk or (len(chunk) < group and self.drop_tail):
                return
            if index % workers == worker:
                yield from rank_slice(chunk, self.rank, self.world_size, self.micro_batch_size)


_END = object()


def whole_stream(source: Iterable) -> Iterator[Any]:
    """Iterate ``source`` as a process outside any loader worker would.

    A worker-aware dataset (the pattern in torch's docs, and Hugging Face's streaming
    datasets) yields only its worker's part inside a ``DataLoader`` worker; the split here
    needs every sample, so ``get_worker_info()`` answers None while the source runs.
    """
    from torch.utils.data._utils import worker as worker_module

    iterator = None
    while True:
        saved, worker_module._worker_info = worker_module._worker_info, None
        try:
            if iterator is None:
                iterator = iter(source)
            sample = next(iterator)
        except StopIteration:
            return
        finally:
            worker_module._worker_info = saved
        yield sample


# --- what each rank iterates ------------------------------------------------------------------


class RankBatches:
    """This rank's micro-batches of one kind of data, one epoch at a time.

    Attributes:
        kind: what the user passed, in words (for messages).
        samples_per_micro_step: samples one micro-step consumes over all ranks.
        ends_per_rank: ranks may run out at different micro-steps (ready per-rank
            batches), so the loop must make them agree.
        positions_exactly: :meth:`epoch` can start mid-epoch without reading the skipped
            samples (else it reads and discards them, and says so).
    """

    kind = "data"
    ends_per_rank = False
    positions_exactly = True

    def __init__(self, samples_per_micro_step: int):
        self.samples_per_micro_step = samples_per_micro_step

    def epoch(self, epoch: int, skip_samples: int = 0) -> Iterator[Any]:
        """This rank's micro-batches of ``epoch``, from global sample ``skip_samples`` on."""
        raise NotImplementedError

    def micro_batches_per_epoch(self) -> int | None:
        """This rank's micro-batches in a whole epoch, or None when unknown (a stream)."""
        return None

    def samples_per_epoch(self) -> int | None:
        """Samples (over all ranks) that a whole epoch consumes, or None when unknown."""
        per_epoch = self.micro_batches_per_epoch()
        return None if per_epoch is None else per_epoch * self.samples_per_micro_step


class LoaderBatches(RankBatches):
    """A ``DataLoader`` zeroloop built (over a :class:`GlobalBatchSampler` or a
    :class:`ShardedStream`). Its worker seeds come from (seed, epoch), never from the
    global torch RNG, so a resumed run draws exactly what an uninterrupted one does."""

    def __init__(self, loader: DataLoader, kind: str, samples_per_micro_step: int, seed: int,
                 position: Callable[[int, int], None], length: Callable[[], int | None]):
        super().__init__(samples_per_micro_step)
        self.loader = loader
        self.kind = kind
        self.seed = seed
        self._position = position
        self._length = length

    def epoch(self, epoch: int, skip_samples: int = 0) -> Iterator[Any]:
        self._position(epoch, skip_samples)
        self.loader.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return iter(self.loader)

    def micro_batches_per_epoch(self) -> int | None:
        return self._length()


class StreamBatches(LoaderBatches):
    positions_exactly = False  # a stream is read and discarded up to the position


class ReadyBatches(RankBatches):
    """Batches the user made: used as they come, re-iterated each epoch when possible.

    Samples are counted as the configured micro-batch size per micro-batch; a first batch
    of another size is reported once (the count would not be what it holds).
    """

    positions_exactly = False

    def __init__(self, batches: Iterable, kind: str, micro_batch_size: int, world_size: int, rank: int,
                 ends_per_rank: bool):
        super().__init__(micro_batch_size * world_size)
        self.batches = batches
        self.kind = kind
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.ends_per_rank = ends_per_rank
        self._size_checked = False

    def epoch(self, epoch: int, skip_samples: int = 0) -> Iterator[Any]:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)
        batches = iter(self.batches)
        skip = skip_samples // self.samples_per_micro_step
        if skip:
            if self.rank == 0:
                log.info("%s cannot start mid-epoch: reading and discarding %d micro-batches to reach the "
                         "resume position", self.kind, skip)
            for _ in range(skip):
                next(batches, None)
        return batches if self._size_checked else self._checking_first(batches)

    def _checking_first(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            if not self._size_checked:
                self._size_checked = True
                rows = count_rows(batch)
                if rows != self.micro_batch_size:
                    log.warning("%s: the first batch holds %d rows but train_micro_batch_size_per_gpu is %d; "
                                "samples are counted at %d per micro-batch", self.kind, rows,
                                self.micro_batch_size, self.micro_batch_size)
            yield batch

    def micro_batches_per_epoch(self) -> int | None:
        try:
            return len(self.batches)  # type: ignore[arg-type]
        except TypeError:
            return None


# --- building them ----------------------------------------------------------------------------


def is_sample_sequence(data: Any) -> bool:
    """A map-style dataset or a sized, indexable sequence of samples (list, tuple, tensor)."""
    if isinstance(data, (DataLoader, IterableDataset, PerRankBatches, Mapping, str, bytes)):
        return False
    if isinstance(data, Dataset):
        return hasattr(data, "__len__")
    return isinstance(data, Sequence) or (hasattr(data, "__len__") and hasattr(data, "__getitem__"))


def loader_batch_size(data: Any) -> int | None:
    """The ``batch_size`` of a user's ``DataLoader`` (for an ``"auto"`` micro-batch), else None."""
    return data.batch_size if isinstance(data, DataLoader) and isinstance(data.batch_size, int) else None


def rank_batches(data: Any, *, name: str, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool) -> RankBatches:
    """This rank's micro-batches of ``data``.

    Args:
        data: any kind listed in this module's docstring.
        name: the argument it came from (``"train_data"``), for messages.
        micro_batch_size: samples per rank per micro-step.
        rank, world_size: this rank's place among the data-parallel ranks.
        seed: the shuffle seed (every rank shares it; the epoch varies it).
        train: shuffle by default and drop the ragged tail (training), or keep the
            order and every sample (evaluation).

    Returns:
        A :class:`RankBatches`.

    Raises:
        ConfigError: the data cannot be split or batched as it is; the message names
            ``name`` and the fix.
    """
    if isinstance(data, PerRankBatches):
        return ReadyBatches(data, f"{name} (PerRankBatches)", micro_batch_size, world_size, rank,
                            ends_per_rank=world_size > 1)
    if isinstance(data, DataLoader):
        return _reshard(data, name=name, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                        seed=seed, train=train)
    if isinstance(data, IterableDataset):
        return _stream(data, {}, kind=f"{name} (IterableDataset)", name=name, micro_batch_size=micro_batch_size,
                       rank=rank, world_size=world_size, seed=seed, train=train)
    if is_sample_sequence(data):
        return _sampled(data, {}, kind=f"{name} ({type(data).__name__} of samples)", name=name,
                        micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                        shuffle=train, train=train)
    if isinstance(data, Iterable):
        if world_size > 1:
            raise ConfigError([
                f"{name}: a {type(data).__name__} of ready batches on {world_size} ranks is ambiguous: zeroloop "
                "cannot split it, and every rank would train on the same batches. Pass the samples as a "
                "Dataset, a list or an IterableDataset (zeroloop splits and batches them), or, if each rank's "
                f"iterable already yields that rank's own batches, wrap it: {name}=PerRankBatches(...)"],
                subject="TrainerLoop arguments")
        return ReadyBatches(data, f"{name} ({type(data).__name__} of batches)", micro_batch_size, world_size,
                            rank, ends_per_rank=False)
    raise ConfigError([f"{name}: must be a Dataset, a list of samples, a DataLoader, an IterableDataset or an "
                       f"iterable of batches, got {type(data).__name__}"], subject="TrainerLoop arguments")


def _reshard(loader: DataLoader, *, name: str, micro_batch_size: int, rank: int, world_size: int, seed: int,
             train: bool) -> RankBatches:
    """A user's ``DataLoader`` split across ranks, keeping its settings."""
    if loader.batch_size is None:
        raise ConfigError([
            f"{name}: a DataLoader with its own batch_sampler (or batch_size=None) cannot be split across "
            "ranks by zeroloop; pass its dataset with a sampler and batch_size, or wrap a loader that already "
            f"yields this rank's batches: {name}=PerRankBatches(loader)"], subject="TrainerLoop arguments")
    if train and loader.batch_size != micro_batch_size:
        raise ConfigError([
            f"{name}: the DataLoader's batch_size={loader.batch_size} contradicts the config's "
            f"train_micro_batch_size_per_gpu={micro_batch_size}; make them agree, or set the config's value "
            "to \"auto\" to take the loader's"], subject="TrainerLoop arguments")
    settings = loader_settings(loader)
    kind = f"{name} (DataLoader)"
    if isinstance(loader.dataset, IterableDataset):
        return _stream(loader.dataset, settings, kind=kind, name=name, micro_batch_size=loader.batch_size,
                       rank=rank, world_size=world_size, seed=seed, train=train)
    sampler = loader.sampler
    shuffle, order_source = isinstance(sampler, RandomSampler), None
    if isinstance(sampler, DistributedSampler):
        shuffle = sampler.shuffle  # the loader was split by hand: zeroloop splits its dataset again
    elif isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None):
        order_source = sampler
    elif not isinstance(sampler, (RandomSampler, SequentialSampler)):
        order_source = sampler  # a custom order (weighted, bucketed by length...): kept, then split
    return _sampled(loader.dataset, settings, kind=kind, name=name, micro_batch_size=loader.batch_size,
                    rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, train=train,
                    order_source=order_source)


def loader_settings(loader: DataLoader) -> dict[str, Any]:
    """The settings of a user's ``DataLoader`` that the re-sharded one keeps."""
    settings = {"collate_fn": loader.collate_fn, "num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
                "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
                "multiprocessing_context": loader.multiprocessing_context,
                "persistent_workers": loader.persistent_workers}
    if loader.num_workers:
        settings["prefetch_factor"] = loader.prefetch_factor
    if getattr(loader, "pin_memory_device", ""):
        settings["pin_memory_device"] = loader.pin_memory_device
    if hasattr(loader, "in_order"):
        settings["in_order"] = loader.in_order
    return settings


def _sampled(dataset: Any, settings: dict[str, Any], *, kind: str, name: str, micro_batch_size: int, rank: int,
             world_size: int, seed: int, shuffle: bool, train: bool,
             order_source: Iterable[int] | None = None) -> LoaderBatches:
    collate = settings.pop("collate_fn", None) or default_collate
    check_batchable(dataset, collate, name, micro_batch_size * world_size, train)
    sampler = GlobalBatchSampler(len(dataset), micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                                 seed=seed, shuffle=shuffle, drop_tail=train, order_source=order_source)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=NamedCollate(collate, name),
                        generator=torch.Generator(), **settings)
    return LoaderBatches(loader, kind, sampler.group, seed, sampler.set_position, sampler.__len__)


def _stream(dataset: IterableDataset, settings: dict[str, Any], *, kind: str, name: str, micro_batch_size: int,
            rank: int, world_size: int, seed: int, train: bool) -> StreamBatches:
    collate = settings.pop("collate_fn", None) or default_collate
    if settings.get("persistent_workers"):
        # Workers keep the copy of the stream they started with; each epoch's start
        # position and set_epoch must reach them, so they start anew every epoch.
        log.info("%s: persistent_workers is turned off for a stream (each epoch's position must reach the "
                 "workers)", kind)
        settings["persistent_workers"] = False
    stream = ShardedStream(dataset, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                           drop_tail=train)
    loader = DataLoader(stream, batch_size=micro_batch_size, collate_fn=NamedCollate(collate, name),
                        generator=torch.Generator(), **settings)
    group = micro_batch_size * world_size

    def position(epoch: int, skip_samples: int) -> None:
        stream.epoch, stream.skip = epoch, skip_samples
        if skip_samples and rank == 0:
            log.info("%s cannot start mid-epoch: every rank reads and discards %d samples to reach the resume "
                     "position", kind, skip_samples)

    def length() -> int | None:
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
        return size // group if train else -(-size // group)

    return StreamBatches(loader, kind, group, seed, position, length)


class NamedCollate:
    """A ``collate_fn`` whose failure names the argument and the fix (picklable, for workers)."""

    def __init__(self, collate_fn: Callable[[list], Any], name: str):
        self.collate_fn = collate_fn
        self.name = name

    def __call__(self, samples: list) -> Any:
        try:
            return self.collate_fn(samples)
        except Exception as e:  # noqa: BLE001 - re-raised with the argument and the fix
            raise TypeError(unbatchable(self.name, e)) from e


def unbatchable(name: str, error: Exception) -> str:
    return (f"{name}: its samples cannot be batched ({type(error).__name__}: {error}). Samples must be tensors, "
            "numbers or dicts/tuples of them with equal shapes; pad them with a collate_fn "
            f"(DataLoader(dataset, batch_size=..., collate_fn=...) as {name}), or pass ready batches "
            "(PerRankBatches)")


def check_batchable(dataset: Any, collate: Callable[[list], Any], name: str, group: int, train: bool) -> None:
    """Fail before any engine is built when the data is empty, too small or cannot be batched.

    Raises:
        ConfigError: naming ``name`` and the fix.
    """
    size = len(dataset)
    if size == 0:
        raise ConfigError([f"{name}: is empty; pass at least one sample"], subject="TrainerLoop arguments")
    if train and size < group:
        raise ConfigError([f"{name}: {size} samples make no micro-batch of {group} (micro-batch x ranks; the "
                           "ragged tail is dropped); pass more samples or lower train_micro_batch_size_per_gpu"],
                          subject="TrainerLoop arguments")
    try:
        collate([dataset[i] for i in range(min(2, size))])
    except Exception as e:  # noqa: BLE001 - re-raised with the argument and the fix
        raise ConfigError([unbatchable(name, e)], subject="TrainerLoop arguments") from e


# --- batches ----------------------------------------------------------------------------------


def move_to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in a (nested) batch to ``device``.

    Floating tensors are cast to ``float_dtype`` when given (the engine's bf16/fp16
    compute dtype); integer tensors (token ids, labels) keep their dtype.
    """
    if isinstance(batch, torch.Tensor):
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=float_dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device, float_dtype) for k, v in batch.items()}
        return moved if type(batch) is dict else type(batch)(moved)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device, float_dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, float_dtype) for v in batch)
    return batch


def iter_tensors(batch: Any):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from iter_tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from iter_tensors(value)


def count_rows(batch: Any) -> int:
    """Rows in the batch: the leading dimension of its first tensor (0 if none). Used to
    weight evaluation batches and to check ready-made batches, never to count training."""
    for tensor in iter_tensors(batch):
        if tensor.dim() > 0:
            return tensor.shape[0]
    return 0


def count_tokens(batch: Any) -> int | None:
    """Tokens in the batch: elements of ``input_ids`` or of the first integer tensor of
    two or more dimensions ([batch, sequence]); None when the batch carries no tokens."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    for tensor in iter_tensors(batch):
        if tensor.dim() >= 2 and not tensor.is_floating_point() and not tensor.is_complex() \
                and tensor.dtype != torch.bool:
            return tensor.numel()
    return None
