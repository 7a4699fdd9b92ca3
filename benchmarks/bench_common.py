"""What every benchmark records with its figures: the machine (CPU model, cores, load, the hypervisor's steal
time), and one JSON writer."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from braintumor_flax.xla import cpu_model  # the one CPU-name reader (training records use it too)


def cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat, all CPUs): user, nice, system, idle, iowait, irq, softirq,
    steal. None where there is no /proc."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    return [int(v) for v in first[1:9]]


def cpu_shares(start: list[int] | None) -> dict[str, float] | None:
    """Since `start` (a `cpu_ticks()`): the share of all CPU time that was busy, and that the hypervisor gave to
    other machines (steal). A run with much steal measured a slower machine than the same run without."""
    end = cpu_ticks()
    if start is None or end is None:
        return None
    delta = [b - a for a, b in zip(start, end, strict=True)]
    total = sum(delta) or 1
    idle = delta[3] + delta[4]
    return {"busy": round((total - idle - delta[7]) / total, 4), "steal": round(delta[7] / total, 4)}


def machine(loadavg_start: list[float] | None = None, ticks_start: list[int] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    with contextlib.suppress(OSError):
        info["avx512"] = " avx512f " in Path("/proc/cpuinfo").read_text()
    if loadavg_start is not None:
        info["loadavg_start"] = loadavg_start
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    shares = cpu_shares(ticks_start)
    if shares is not None:
        info["cpu_shares_during_run"] = shares
    return info


def finish(path: str | Path, result: dict[str, Any], *, started: float, ticks: list[int] | None) -> int:
    """A benchmark's last step: its wall time since `started` (a `time.perf_counter()`) and the machine (with
    the CPU shares since `ticks`) added to `result`, which is written to `path`. Returns the exit status 0."""
    import time

    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine(ticks_start=ticks)
    write_json(path, result)
    return 0


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write the result file (creating its folder) and print it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
