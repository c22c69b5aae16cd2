"""What ``from_pretrained`` needs beside the weights: a Hugging Face model's config files.

``AutoModel*.from_pretrained(folder)`` reads ``config.json`` (the architecture, and
``tie_word_embeddings``, by which it re-ties ``lm_head.weight`` that the safetensors store
once) and, for generating models, ``generation_config.json``. zeroloop writes them wherever
it writes weights of a model that has a Hugging Face ``config``: into every checkpoint
(so ``zeroloop consolidate`` can copy them) and next to the final weights. Models without
one (plain ``nn.Module``) get no such files. transformers itself is not needed: the model's
own config objects write the files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import torch

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
CONFIG_FILES = (CONFIG_NAME, GENERATION_CONFIG_NAME)
# The config key naming the weights' dtype: "dtype" in transformers 5, "torch_dtype" before.
DTYPE_KEYS = ("dtype", "torch_dtype")


def has_pretrained_config(model: Any) -> bool:
    """The model carries a Hugging Face config (something with ``save_pretrained``)."""
    return callable(getattr(getattr(model, "config", None), "save_pretrained", None))


def save_pretrained_configs(model: Any, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> list[str]:
    """Write ``config.json`` (and ``generation_config.json`` when the model has one) into ``folder``.

    Args:
        model: the model (not the engine); nothing is written without a Hugging Face config.
        folder: an existing folder.
        dtype: the dtype of the weights written beside it (recorded in the config, as
            ``save_pretrained`` does); None keeps the config's.

    Returns:
        The names of the files written.
    """
    if not has_pretrained_config(model):
        return []
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # what save_pretrained records too
    config.save_pretrained(os.fspath(folder))
    written = [CONFIG_NAME]
    if dtype is not None:
        set_config_dtype(os.path.join(folder, CONFIG_NAME), dtype)
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(getattr(generation, "save_pretrained", None)):
        generation.save_pretrained(os.fspath(folder))
        written.append(GENERATION_CONFIG_NAME)
    return written


def copy_pretrained_configs(source: str, folder: str, dtype: torch.dtype | None = None) -> list[str]:
    """Copy the config files a checkpoint holds (see :func:`save_pretrained_configs`) into
    ``folder``, with ``dtype`` recorded in ``config.json``.

    Returns:
        The names of the files copied (none for a checkpoint of a model without one).
    """
    copied = []
    for name in CONFIG_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
            copied.append(name)
    if dtype is not None and CONFIG_NAME in copied:
        set_config_dtype(os.path.join(folder, CONFIG_NAME), dtype)
    return copied


def set_config_dtype(path: str, dtype: torch.dtype) -> None:
    """Record the weights' dtype in a ``config.json`` under the key its transformers version uses."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    keys = [key for key in DTYPE_KEYS if key in config] or ["torch_dtype"]
    for key in keys:
        config[key] = str(dtype).removeprefix("torch.")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
