"""The machine a benchmark ran on, in one line for its table."""

import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GiB, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
