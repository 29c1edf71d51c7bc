"""Where a number was measured: the facts every results file carries (benchmarks and experiments)."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def machine_facts() -> dict[str, Any]:
    """Where a number was measured: host, CPU count, GPU (if any), commit, date."""
    import torch

    facts: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        facts["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        facts["commit"] = None
    return facts
