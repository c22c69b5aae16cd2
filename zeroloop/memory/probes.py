"""How much memory this process can use: the GPU's free memory (CUDA), or on a CPU the
host's available RAM (/proc/meminfo, else psutil)."""

from __future__ import annotations

def visible_device_memory(local_ranks: int) -> int:
    """Bytes this rank may use: free GPU memory plus what it already holds, or on a CPU
    the host's available RAM (``MemAvailable``) split between the local ranks."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_allocated())
    return available_ram() // max(1, local_ranks)


def available_ram() -> int:
    """``MemAvailable`` from /proc/meminfo, else psutil's figure (bytes)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)
