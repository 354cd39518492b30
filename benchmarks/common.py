"""Shared benchmark helpers: thread pinning, median timing, measured matmul peak, JSON + table output.

The machine is shared and noisy: every figure is a median of repeats, and the peak is measured in the same
process and run as the workload it is compared with.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def setup(threads: int, seed: int = 0) -> dict:
    """Pin intra-op threads (and inter-op to 1) so runs compare; returns environment facts for the JSON."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; harmless if already set
        pass
    torch.manual_seed(seed)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed calls (synchronises CUDA if used)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def summarize(times: Sequence[float]) -> dict:
    """Median (the figure we quote) and the spread, so a noisy run is visible in the JSON."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def matmul_peak(
    dtype: torch.dtype,
    size: int = 2048,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    backend: str = "torch",
    warmup: int = 3,
) -> dict:
    """Achieved FLOP/s of a square `size` matmul (2 n^3 FLOPs) in `dtype`: the practical peak MFU divides by.

    backend "torch": `a @ b` (on CPU: MKL for fp32, oneDNN for bf16); "onednn": oneDNN's matmul for any dtype
    (`torch.ops.mkldnn._linear_pointwise`, what `ray_dpo.core.kernels.linear` runs for fp32 on CPU).
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    if backend == "onednn":
        fn = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [None], "")
    else:
        fn = lambda: a @ b
    times = time_fn(fn, warmup=warmup, repeats=repeats)
    median = statistics.median(times)
    name = str(dtype).removeprefix("torch.")
    return {"dtype": name, "backend": backend, "size": size, "median_s": median, "flops": 2 * size**3 / median}


def cpu_info() -> dict:
    """What the CPU is (a VM may hide the model name: family / model numbers say the generation) and the matmul
    features that decide the peaks (AVX-512, AVX-512 BF16, AMX)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "model": info.get("model name", platform.processor() or platform.machine()),
        "vendor": info.get("vendor_id", ""),
        "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "logical_cpus": os.cpu_count(),
        "features": [f for f in wanted if f in flags],
    }


def cpu_model() -> str:
    """One line for tables and JSON: the model name, family/model numbers and the logical CPU count."""
    info = cpu_info()
    return f"{info['model']} (family/model {info['family_model']}), {info['logical_cpus']} logical CPUs"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: on a shared machine, how busy it was around a measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def print_table(title: str, rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """`columns`: (key, header, format spec). Markdown, so it pastes into an issue."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header for _, header, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [("" if row.get(key) is None else format(row[key], spec)) for key, _, spec in columns]
        print("| " + " | ".join(cells) + " |")


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
