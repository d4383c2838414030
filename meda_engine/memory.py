"""Peak-memory measurement around one generate call.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's resident-set high-water
mark (``VmHWM``), reset through ``/proc/self/clear_refs`` where Linux allows it; otherwise the
lifetime peak from ``getrusage`` (then the figure is an upper bound, and the kind says so).
"""

from __future__ import annotations

import resource
import sys

import torch


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS of this process
        except OSError:
            self.kind = "rss_lifetime_peak"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
