"""Markdown tables from every ``benchmarks/results/*.json``, and a PNG plot of throughput.

    python benchmarks/report.py                  # Markdown to stdout, plot to results/throughput.png
    python benchmarks/report.py --out report.md

The tables are generic, so a new benchmark's JSON needs no code here: the run's machine
and versions first, then every list of records (and every mapping of records, such as
per-contender results) as a table of its scalar fields, nested mappings flattened one level
(``predicted.peak``). The plot (matplotlib, from the ``bench`` extra) has one row per
``throughput_*.json``: optimizer steps/s and peak memory per rank against the ZeRO stage,
a line per model size and precision.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MACHINE_KEYS = ("machine", "versions")
MAX_COLUMNS = 14  # wider tables stop being readable on GitHub


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        scalars = all(not isinstance(v, (dict, list)) for v in value)
        return ", ".join(fmt(v) for v in value) if scalars else "…"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 90 else text[:87] + "..."


def is_short_numbers(value: list) -> bool:
    return len(value) <= 8 and all(isinstance(v, (int, float)) for v in value)  # per-round figures


def flatten(record: dict) -> dict:
    """Scalars and short scalar lists, nested mappings one level down as ``outer.inner``."""
    flat, nested = {}, {}  # the record's own fields first: they are what tables are about
    for key, value in record.items():
        if isinstance(value, dict):
            nested.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif not isinstance(value, list) or is_short_numbers(value):
            flat[key] = value
    return {**flat, **nested}


def table(records: list[dict], first_column: str | None = None) -> str:
    rows = [flatten(r) for r in records]
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    columns = columns[:MAX_COLUMNS]
    if first_column:
        columns = [first_column] + [c for c in columns if c != first_column]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def is_records(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def is_keyed_records(value) -> bool:
    return isinstance(value, dict) and len(value) > 1 and all(isinstance(v, dict) for v in value.values())


def section(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    name = os.path.splitext(os.path.basename(path))[0]
    out = [f"### {name}", "", f"`{os.path.relpath(path, os.path.dirname(HERE))}`", ""]
    machine = {}
    for key in MACHINE_KEYS:
        machine.update(data.get(key) or {})
    scalars = {k: v for k, v in data.items() if k not in MACHINE_KEYS and not isinstance(v, (dict, list))}
    scalars.update({k: v for k, v in data.items() if isinstance(v, dict) and not is_keyed_records(v)
                    and k not in MACHINE_KEYS and all(not isinstance(x, (dict, list)) for x in v.values())})
    about = {**machine, **flatten(scalars)}
    if about:
        out += ["| field | value |", "| --- | --- |"]
        out += [f"| {k} | {fmt(v)} |" for k, v in about.items()] + [""]
    for key, value in data.items():
        if is_records(value):
            out += [f"**{key}**", "", table(value), ""]
        elif is_keyed_records(value) and key not in MACHINE_KEYS:
            out += [f"**{key}**", "", table([{"name": k, **v} for k, v in value.items()], "name"), ""]
        elif isinstance(value, dict) and key not in MACHINE_KEYS and key not in scalars:
            out += [f"**{key}**", "", table([value]), ""]
    return "\n".join(out)


def markdown(paths: list[str]) -> str:
    return "\n".join(["## Results", ""] + [section(p) for p in paths])


def plot(paths: list[str], out: str) -> str | None:
    """Steps/s and peak memory per rank against the ZeRO stage, one row per throughput file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [p for p in paths if os.path.basename(p).startswith("throughput_")]
    if not files:
        return None
    fig, axes = plt.subplots(len(files), 2, figsize=(11, 3.6 * len(files)), squeeze=False)
    for (speed_ax, memory_ax), path in zip(axes, files):
        with open(path) as f:
            data = json.load(f)
        rows = data["throughput"]
        device = data["machine"].get("gpu") or f"CPU, {data['machine'].get('cpus')} cores"
        gpu = "max_memory_allocated_gib" in rows[0]
        for size, precision in sorted({(r["size"], r["precision"]) for r in rows}):
            picked = sorted((r for r in rows if (r["size"], r["precision"]) == (size, precision)),
                            key=lambda r: r["stage"])
            stages = [r["stage"] for r in picked]
            label = f"{size} {precision}"
            speed_ax.plot(stages, [r["steps_per_sec"] for r in picked], marker="o", label=label)
            memory = [r["max_memory_allocated_gib" if gpu else "peak_rss_gib"] for r in picked]
            memory_ax.plot(stages, memory, marker="o", label=label)
        world = rows[0]["world_size"]
        speed_ax.set(title=f"{device}, {world} rank(s): throughput", xlabel="ZeRO stage",
                     ylabel="optimizer steps/s", xticks=[0, 1, 2, 3])
        memory_ax.set(title="peak memory per rank (" + ("max_memory_allocated" if gpu else "RSS") + ")",
                      xlabel="ZeRO stage", ylabel="GiB", xticks=[0, 1, 2, 3])
        speed_ax.legend(fontsize=8)
        memory_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--out", default=None, help="Markdown file (default: stdout)")
    p.add_argument("--plot", default=os.path.join(RESULTS, "throughput.png"))
    args = p.parse_args(argv)

    paths = sorted(glob.glob(os.path.join(args.results, "*.json")))
    text = markdown(paths)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.plot and plot(paths, args.plot):
        print(f"<!-- plot: {args.plot} -->" if not args.out else f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
