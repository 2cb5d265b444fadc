"""Benchmark harness: timing, thread control, machine description, JSON results and ratio tables.

Every benchmark script runs the peers on the same inputs in the same process, prints a table of ratios against
a named baseline and writes its full results to bench/results/<name>.json.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import sparse_retrieval as sr

        info["sparse_retrieval"] = sr.build_info()
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@contextlib.contextmanager
def threads(n: int):
    """Runs a block with torch (and so our CPU kernels) on n threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def with_env(fn: Callable[[], object], name: str, value: str) -> Callable[[], object]:
    """fn run with the environment variable set (the opt-in CUDA kernels read theirs at every call)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def measure(fn: Callable[[], object], warmup: int = 2, repeats: int = 7, min_time: float = 0.0,
            cuda: bool = False) -> dict:
    """Times fn: ``warmup`` untimed calls, then at least ``repeats`` timed calls (more until ``min_time`` seconds
    have passed). Returns seconds: median, min, and the list of times."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "times": times}


def table(rows: list[dict], columns: list[str], title: str | None = None) -> str:
    """A plain-text table (also valid Markdown) of the given columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    return f"{title}\n{text}" if title else text


def add_ratios(rows: list[dict], key: Callable[[dict], tuple], baseline: str, method_col: str = "method",
               time_col: str = "median_s", out_col: str = "speedup") -> None:
    """For rows sharing ``key(row)``, sets ``out_col`` = baseline's time / the row's time (above 1 = faster)."""
    base = {key(r): r[time_col] for r in rows if r[method_col] == baseline}
    for r in rows:
        b = base.get(key(r))
        r[out_col] = (b / r[time_col]) if b and r[time_col] else float("nan")


def write_results(name: str, payload: dict) -> Path:
    """Writes {machine, **payload} to bench/results/<name>.json (atomically) and returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    os.replace(tmp, path)
    return path
