"""What the benchmark reports say about the machine they ran on (shared by the benchmark
scripts, which import it as a sibling module)."""

from __future__ import annotations

import pathlib
import platform


def cpu_info() -> tuple[str, int | None]:
    """CPU model name and physical core count, from /proc/cpuinfo where there is one."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), None
    model, cores, physical = None, set(), None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return model or platform.processor() or platform.machine(), len(cores) or None
