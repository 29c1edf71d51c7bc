"""The study's closed-loop arms: the generator steered by the trainer's caption feedback, beside the same
stream walked uniformly, both held to the offline arm's groups.

``stablerep-bench study --closed-loop`` adds two StableRep arms that differ only in the generator's
``--caption-policy``:

- ``online-uniform``: ``--caption-policy uniform`` (every caption in turn);
- ``online-hard``: ``--caption-policy hard``, the trainer reporting each caption's loss every
  ``--feedback-every`` steps (``stablerep-train --feedback-every``), its generator weighing a caption
  ``(floor + score / median) ** alpha`` with the study's ``--hard-floor`` and ``--hard-alpha`` (the
  generator's defaults, 1 and 1);
- ``online-hard-sharp``, only when ``--arms`` names it: the same with ``--sharp-floor`` and
  ``--sharp-alpha`` (0 and 4: no floor, a caption scored twice the median weighs 16 median ones).

Equal groups: both trainers keep the replay rate contract ``--samples-per-insert R`` with R the
offline arm's reuse (``--offline-reuse``, 9), and their generator runs at ``--loop-image-rate``
images/s, below what the trainer would draw at R, so the trainer waits for fresh groups and every
arm trains on about ``K = steps x captions per step / R`` groups, the offline arm's K. What each arm
really received is recorded (``groups_received``), with what the generator made (its summary line:
``groups_generated``, feedback merged) and, per caption, the groups the trainer drew and the
groups the generator handed out (``experiments.study_diversity`` turns them into shares and Gini).
"""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any

#: name -> generator caption policy of the closed-loop arms
LOOP_POLICIES = {"online-uniform": "uniform", "online-hard": "hard"}
#: closed-loop arms that run only when ``--arms`` names them (name -> policy)
OPTIONAL_LOOP_POLICIES = {"online-hard-sharp": "hard"}
#: the sharp arm's hard-policy weights unless ``--sharp-floor`` / ``--sharp-alpha`` say otherwise
SHARP_FLOOR, SHARP_ALPHA = 0.0, 4.0
STATE_DIR = "generator_state"


def add_policy_arguments(parser: Any) -> None:
    """The study's flags for the hard policy's weights (``--hard-*``: online-hard, ``--sharp-*``: online-hard-sharp)."""
    from generator_service.caption_policy import DEFAULT_HARD_ALPHA, DEFAULT_HARD_FLOOR

    for arm, floor, alpha in (("hard", DEFAULT_HARD_FLOOR, DEFAULT_HARD_ALPHA), ("sharp", SHARP_FLOOR, SHARP_ALPHA)):
        name = "online-hard" if arm == "hard" else "online-hard-sharp"
        parser.add_argument(f"--{arm}-floor", type=float, default=floor,
                            help=f"{name}: the generator's --hard-floor (>= 0; default: %(default)s)")
        parser.add_argument(f"--{arm}-alpha", type=float, default=alpha,
                            help=f"{name}: the generator's --hard-alpha (> 0; default: %(default)s)")


def policy_weights(args: Any, parser: Any) -> dict[str, float]:
    """The plan fields of :func:`add_policy_arguments`'s flags, checked (``parser.error`` names a bad one)."""
    out = {}
    for arm in ("hard", "sharp"):
        floor, alpha = getattr(args, f"{arm}_floor"), getattr(args, f"{arm}_alpha")
        if not math.isfinite(floor) or floor < 0:
            parser.error(f"--{arm}-floor must be a finite number >= 0, got {floor}")
        if not math.isfinite(alpha) or alpha <= 0:
            parser.error(f"--{arm}-alpha must be a finite number > 0, got {alpha}")
        out.update({f"{arm}_floor": floor, f"{arm}_alpha": alpha})
    return out


def hard_weights(plan: Any, name: str) -> tuple[float, float]:
    """(floor, alpha) of the closed-loop arm ``name``'s hard policy, from the study plan."""
    if name in OPTIONAL_LOOP_POLICIES:
        return plan.sharp_floor, plan.sharp_alpha
    return plan.hard_floor, plan.hard_alpha


class CaptionCountingSource:
    """A training source that counts the caption ids of every batch it hands out (everything else
    goes to ``source``): ``counts`` is caption id -> groups drawn for training."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.counts: collections.Counter[int] = collections.Counter()

    def next_batch(self):
        batch = self._source.next_batch()
        self.counts.update(int(c) for c in batch.caption_ids.tolist())
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def loop_generator_flags(policy: str, out: Path, image_rate: float, images_per_group: int,
                         weights: tuple[float, float] | None = None) -> list[str]:
    """Generator flags of a closed-loop arm: its policy (``weights``: the hard policy's floor and alpha),
    a state folder (where the policy's per-caption counts are written at exit) and the loop's throttle."""
    flags = ["--caption-policy", policy, "--state", str(out / STATE_DIR),
             "--max-groups-per-s", f"{image_rate / images_per_group:g}"]
    if policy == "hard" and weights is not None:
        flags += ["--hard-floor", f"{weights[0]:g}", "--hard-alpha", f"{weights[1]:g}"]
    return flags


def loop_trainer_flags(policy: str, reuse: float, feedback_every: int) -> list[str]:
    """Trainer flags of a closed-loop arm: the rate contract, and feedback for the hard policy (none
    for the uniform walk, which would not read it)."""
    return ["--samples-per-insert", f"{reuse:g}", "--feedback-every", str(feedback_every if policy == "hard" else 0)]


def generator_summary(log_path: Path) -> dict[str, Any]:
    """The summary JSON line a stopped ``stablerep-generator`` printed last in its log ({} if none)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def generated_per_caption(out: Path, policy: str, caption_ids: list[int], handed_out: int | None) -> dict[int, int] | None:
    """Caption id -> groups the generator handed out: the hard policy's counts from its state file; the
    uniform walk's from how many positions it handed out (``handed_out``). None when not known."""
    if policy == "uniform":
        if handed_out is None:
            return None
        laps, rest = divmod(handed_out, len(caption_ids))
        return {c: laps + (1 if i < rest else 0) for i, c in enumerate(caption_ids)}
    try:
        state = json.loads((out / STATE_DIR / "online_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {int(c): int(n) for c, n in state.get("policy", {}).get("counts", [])}


def loop_record(summary: dict[str, Any], generator: dict[str, Any]) -> dict[str, Any]:
    """What a closed-loop arm adds to its row: the feedback both sides counted and the groups made."""
    stats = summary.get("source_stats") or {}
    server = generator.get("server") or {}
    return {
        "groups_generated": generator.get("groups"),
        "groups_sent": server.get("groups_sent"),
        "feedback_sent_messages": stats.get("feedback_messages"),
        "feedback_sent_entries": stats.get("feedback_entries"),
        "feedback_merged": server.get("feedback_merged"),
        "feedback_rate_limited": server.get("feedback_rate_limited"),
        "stall_seconds": stats.get("stall_seconds"),
        "rate_limited_batches": stats.get("rate_limited_batches"),
    }


def diversity_record(draws: dict[int, int], captions: Path, attributes: tuple[str, ...],
                     generated: dict[int, int] | None = None) -> dict[str, Any]:
    """An arm's spread over the caption file's captions: ``drawn`` (groups drawn for training per
    caption) and, when known, ``generated`` (groups the generator handed out), each with its Gini
    (``study_diversity.diversity``); for procedural captions also their shares per attribute value."""
    from experiments.study_diversity import attribute_shares, diversity
    from generator_service.captions import load_captions

    caption_set = load_captions(captions)
    text = dict(zip(caption_set.caption_ids, caption_set.captions))
    record: dict[str, Any] = {"drawn": diversity(draws, caption_set.caption_ids)}
    if generated is not None:
        record["generated"] = diversity(generated, caption_set.caption_ids)
    try:
        record["drawn_shares"] = attribute_shares(draws, text, attributes)
        if generated is not None:
            record["generated_shares"] = attribute_shares(generated, text, attributes)
    except (ValueError, KeyError):  # not procedural captions or attributes: no per-value shares
        pass
    return record


def load_caption_ids(captions: Path) -> list[int]:
    """The caption ids of a caption file, in the order a generator walks them."""
    from generator_service.captions import load_captions

    return list(load_captions(captions).caption_ids)
