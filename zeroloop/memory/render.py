"""A :class:`~zeroloop.memory.Plan` as a fixed-width table for a terminal
(GB = 1e9 bytes, MB = 1e6 bytes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..sizes import human

if TYPE_CHECKING:
    from . import Plan

TABLE_COLUMNS = (
    ("option", 28), ("params", 9), ("grads", 9), ("optim", 9), ("states", 9), ("+fp32 g", 9),
    ("+live", 9), ("+buckets", 9), ("+activ", 9), ("=device", 9), ("host/node", 10), ("fits", 5),
    ("DS device", 10), ("DS host", 10),
)


def format_table(result: Plan) -> str:
    """Fixed-width table: one row per option, the recommendation and warnings below."""
    i = result.inputs
    lines = [f"{i.params.total:,} parameters ({i.params.trainable:,} trainable, largest layer "
             f"{i.params.largest_layer:,}), {i.world_size} devices "
             f"({i.nodes} node(s) x {i.devices_per_node}), "
             f"{i.precision}, {i.optimizer} (K={i.k:g}), device memory {human(i.device_memory)}",
             "Per device unless marked; GB = 1e9 bytes, MB = 1e6 bytes (GiB = 2^30 bytes = 1.074 GB). "
             "'DS' = DeepSpeed's estimator.",
             "".join(name.ljust(width) for name, width in TABLE_COLUMNS)]
    for o in result.options:
        fit = {True: "yes", False: "no", None: "?"}[o.fits]
        cells = (o.option.label + (" *" if o.name == i.current else ""), human(o.params), human(o.grads),
                 human(o.optimizer), human(o.model_states), human(o.fp32_grads), human(o.live_params),
                 human(o.buffers), human(o.activations), human(o.device_total), human(o.host_per_node), fit,
                 human(o.deepspeed_device), human(o.deepspeed_host))
        lines.append("".join(cell.ljust(width) for cell, (_, width) in zip(cells, TABLE_COLUMNS)))
    if i.current:
        lines.append("* the option your DeepSpeed config selects")
    if result.activations:
        lines.append(f"activations per device: {human(result.activations[0])} without checkpointing, "
                     f"{human(result.activations[1])} with")
    lines.append(f"recommended: {result.recommended or 'none'}: {result.reason}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)
