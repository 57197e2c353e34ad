"""Machine facts printed beside every figure (the benchmarks' ratios are only comparable within
one run: the development machine is shared)."""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """``--set key=value ...``, repeatable: ``--set a=1 --set b=2`` and ``--set a=1 b=2`` both
    give ``["a=1", "b=2"]`` (``nargs="*"`` alone kept only the last ``--set``, silently)."""
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides key=value (repeatable)")  # fmt: skip


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def facts(tag: str = "") -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return (
        f"[machine{' ' + tag if tag else ''}] {os.cpu_count()} CPUs ({cpu_model()}){mem}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
    )


class PeakMemory:
    """Samples the memory of this process and all its descendants (Ray's GCS, raylet, workers)
    every ``interval`` s: peak of the summed RSS (shared pages counted once per process) and of
    the summed PSS (shared pages split between the processes that map them)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        rss = pss = n = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            n += 1
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, n)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
