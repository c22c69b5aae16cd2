"""Parameter groups for the optimizer: one group, or weight decay only where it belongs.

The convention of Hugging Face's ``Trainer`` and nanoGPT: biases and normalization weights
(LayerNorm, RMSNorm, BatchNorm, GroupNorm...) are left out of weight decay; weight matrices
and embeddings keep the optimizer's ``weight_decay``. Decaying a norm's gain pulls it
towards 0 (the layer's output towards nothing), and decaying a bias has no regularizing
purpose.

The groups are plain ``{"params": [...]}`` dicts, so DeepSpeed's config optimizer (and any
torch optimizer) takes them as ``model_parameters``: the config's ``lr``, ``betas`` and
``weight_decay`` are the defaults, a group's own ``weight_decay`` overrides the last.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

# Module classes whose parameters are normalization gains and shifts (classes of other
# libraries are recognized by name: RMSNorm, LlamaRMSNorm, T5LayerNorm...).
NORM_CLASSES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates: those with ``requires_grad``, each once (ties)."""
    return [p for p in model.parameters() if p.requires_grad]


def is_norm_module(module: nn.Module) -> bool:
    """A normalization layer: a torch norm class, or a class whose name ends in ``Norm``
    (``RMSNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``...)."""
    return isinstance(module, NORM_CLASSES) or re.search(r"norm(\dd)?$", type(module).__name__.lower()) is not None


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters that get no weight decay: biases, normalization
    weights, and any other parameter with fewer than 2 dimensions (nanoGPT's rule: only
    matrices and embeddings are decayed)."""
    names = set()
    for module_name, module in model.named_modules():
        norm = is_norm_module(module)
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if norm or name == "bias" or param.dim() < 2:
                names.add(full)
    return names


def weight_decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two optimizer groups: decayed parameters (the optimizer's ``weight_decay``) and the
    others (``weight_decay=0.0``); empty groups are left out.

    Args:
        model: the model; only parameters with ``requires_grad`` are grouped, tied ones once.

    Returns:
        ``[{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]``, in the
        model's parameter order within each group.
    """
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # ties once, under their first name
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
