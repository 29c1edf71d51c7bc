"""Experiment trackers a run can log to (``run.log_with``): the one list of their names.

``TRACKERS`` is what the config accepts and ``--log-with`` offers; :func:`available_trackers` keeps
the asked-for ones that are installed (Accelerate's ``log_with`` names) and warns about the rest.
"""
from __future__ import annotations

import logging
from typing import Iterable

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb")


def available_trackers(names: Iterable[str]) -> list[str]:
    """``names`` (each in :data:`TRACKERS`) less those not installed, which are skipped with a warning."""
    import accelerate.utils

    chosen = []
    for name in names:
        is_installed = getattr(accelerate.utils, f"is_{name}_available", None)  # Accelerate's own check
        if is_installed is not None and is_installed():
            chosen.append(name)
        else:
            log.warning("logging to %s was asked for but it is not installed; skipped", name)
    return chosen
