"""What every benchmark records with its figures: the machine (CPU model, cores, load), and one JSON writer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from braintumor_flax.xla import cpu_model  # the one CPU-name reader (training records use it too)


def machine(loadavg_start: list[float] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    if loadavg_start is not None:
        info["loadavg_start"] = loadavg_start
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    return info


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write the result file (creating its folder) and print it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
