"""What a benchmark ran on, recorded beside its results.

Ratios are measured against a reference in the same run, but they still
move with the machine: the same code's per-example transformer ratio read
1.24 on one machine of this kind and 1.31 on another, where the plain step
itself took 114 ms and 191 ms (benchmarks/README.md). So every result file
names the CPU, the instruction set PyTorch dispatches to, the cores, the
threads and how busy the machine was.
"""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> dict:
    """Library versions and the machine: merge into a result file's header."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        # the kernels ATen picks (AVX2, AVX512, ...): a plain step's time depends on it
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: the machine may be shared."""
    return list(os.getloadavg())
