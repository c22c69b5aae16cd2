"""The built-in training data: a byte-level corpus that needs no download.

By default it is the Python standard library's own source text, read from the running
interpreter, so it is present on every machine that can run zeroloop. Users can point it
at their own text files or folders instead.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterable

import torch
from torch.utils.data import Dataset

# Folders of the standard library left out: installed third-party code and test data.
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
VOCAB_SIZE = 256  # one token per byte


def stdlib_source_files() -> list[Path]:
    """Every ``.py`` file of the running interpreter's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".py")]
    return found


def text_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into a list of files.

    Raises:
        FileNotFoundError: a path does not exist (named in the message).
    """
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"training text {str(path)!r} does not exist; pass existing files "
                                    "or folders, or none for the built-in standard-library corpus")
    if not found:
        raise FileNotFoundError(f"no files found under {[str(p) for p in paths]}")
    return found


def read_corpus(paths: Iterable[str | os.PathLike] | None = None, max_bytes: int | None = None) -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor of bytes.

    Args:
        paths: text files or folders; None reads the standard library's source.
        max_bytes: stop after this many bytes (None reads everything).
    """
    files = stdlib_source_files() if paths is None else text_files(paths)
    chunks, size = [], 0
    for path in files:
        chunk = path.read_bytes()
        chunks.append(chunk)
        size += len(chunk)
        if max_bytes is not None and size >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class ByteCorpus(Dataset):
    """Non-overlapping windows of ``seq_len`` bytes for next-byte prediction.

    Item ``i`` is ``{"input_ids": bytes[i*L : i*L+L], "labels": bytes[i*L+1 : i*L+L+1]}``
    as int64 tensors.
    """

    def __init__(self, data: torch.Tensor, seq_len: int):
        self.data = data
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.data) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.seq_len
        window = self.data[start:start + self.seq_len + 1].long()
        return {"input_ids": window[:-1], "labels": window[1:]}


def train_eval_split(data: torch.Tensor, seq_len: int, eval_fraction: float = 0.01) -> tuple[ByteCorpus, ByteCorpus]:
    """Split the bytes into a training corpus and a held-out tail for evaluation."""
    cut = int(len(data) * (1 - eval_fraction))
    return ByteCorpus(data[:cut], seq_len), ByteCorpus(data[cut:], seq_len)
