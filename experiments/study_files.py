"""``study.json`` of ``stablerep-bench study``: the plan as stored, written atomically, and read back
for ``--resume`` (which needs the same plan and trainer flags)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.trainer_flags import BadFlags

if TYPE_CHECKING:
    from experiments.study import StudyPlan


def plan_dict(plan: StudyPlan) -> dict[str, Any]:
    """The plan as ``study.json`` stores it (JSON types; ``resume`` is how it ran, not what it runs)."""
    out = json.loads(json.dumps(asdict(plan)))
    out.pop("resume", None)
    return out


def resume_study(root: Path, plan: StudyPlan, trainer_argv: list[str]) -> dict[str, Any]:
    """The ``study.json`` of an earlier run of the same plan in ``root``; :class:`BadFlags` naming the
    first difference (a field of the plan, or the trainer flags) or what is missing."""
    path = root / "study.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadFlags(f"--resume: {path} does not exist (no earlier study in {root})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BadFlags(f"--resume: cannot read {path}: {exc}") from None
    wanted = plan_dict(plan)
    for key, value in wanted.items():
        if saved.get("plan", {}).get(key) != value:
            raise BadFlags(f"--resume: the earlier study in {root} has {key}={saved.get('plan', {}).get(key)!r}, "
                           f"this one {value!r}; give the same flags")
    if saved.get("trainer_flags") != trainer_argv:
        raise BadFlags(f"--resume: the earlier study passed trainer flags {saved.get('trainer_flags')}, "
                       f"this one {trainer_argv}; give the same flags")
    return saved


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
