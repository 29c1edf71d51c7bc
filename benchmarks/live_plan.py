"""The capacity planner over a live run: rates, stall and idle read from the services' Prometheus endpoints.

``stablerep-bench plan --live-trainer URL --live-generator URL [URL ...]`` reads

- from the trainer (``stablerep-train --metrics-port``): ``stablerep_trainer_images_per_s`` (images trained
  per second over the last log interval) and ``stablerep_trainer_stall_ratio`` (the share of that interval
  the draws waited for data), so ``T = images_per_s / (1 - stall_ratio)``: what it trains when never starved;
- from every generator (``stablerep-generator --metrics-port``): per worker (one GPU each)
  ``images_total`` and ``gen_seconds_total``, so ``G = sum images / sum gen seconds``: what one generator GPU
  makes per second while it generates; and ``stablerep_generator_idle_ratio``, the share of its workers'
  time held back for want of client credit.

With the target reuse ``r`` and the trainer GPUs of the run, the planner's ratio ``k* = T / (r G)`` gives the
generator GPUs the trainer needs (``ceil(k* x trainer GPUs)``); :func:`advise` compares it with the workers
that serve now: fewer -> grow the generators by the difference (the trainer stalls); more -> the generators
can feed ``floor(workers / k*)`` trainer GPUs: grow the trainer by the difference (the generators idle).
"""
from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from typing import Any

_SAMPLE = re.compile(r"^(stablerep_[a-z0-9_]+)(\{[^}]*\})?\s+(\S+)$")


def scrape(url: str, timeout: float = 10.0) -> dict[str, list[tuple[str, float]]]:
    """Every ``stablerep_*`` sample ``url`` serves: name -> [(labels text, value)]; ``ValueError`` naming the
    URL when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise ValueError(f"plan: cannot read metrics from {url}: {exc}") from None
    samples: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is not None:
            try:
                value = float(match.group(3))
            except ValueError:
                continue
            samples.setdefault(match.group(1), []).append((match.group(2) or "", value))
    return samples


def _one(samples: dict[str, list[tuple[str, float]]], name: str, url: str, hint: str) -> float:
    values = samples.get(name)
    if not values:
        raise ValueError(f"plan: {url} serves no {name} ({hint})")
    return values[0][1]


def trainer_live(url: str) -> dict[str, float]:
    """``images_per_s``, ``stall_ratio`` and the unstalled ``trainer_rate`` of a live trainer."""
    samples = scrape(url)
    hint = "is it a stablerep-train --metrics-port endpoint, past its first --log-every step?"
    images_per_s = _one(samples, "stablerep_trainer_images_per_s", url, hint)
    stall = _one(samples, "stablerep_trainer_stall_ratio", url, hint)
    if stall >= 1.0:
        raise ValueError(f"plan: {url}: stall_ratio {stall:g}: the trainer only waited, its unstalled rate is unknown")
    return {"images_per_s": images_per_s, "stall_ratio": stall, "trainer_rate": images_per_s / (1.0 - stall)}


def generator_live(url: str) -> dict[str, float]:
    """``workers``, ``images``, ``gen_seconds``, ``idle_ratio`` of a live generator service."""
    samples = scrape(url)
    hint = "is it a stablerep-generator --metrics-port endpoint?"
    idle = _one(samples, "stablerep_generator_idle_ratio", url, hint)
    images = samples.get("stablerep_generator_images_total", [])
    seconds = samples.get("stablerep_generator_gen_seconds_total", [])
    if not images:
        raise ValueError(f"plan: {url} serves no stablerep_generator_images_total ({hint})")
    return {"workers": float(len(images)), "images": sum(v for _, v in images),
            "gen_seconds": sum(v for _, v in seconds), "idle_ratio": idle}


def live_rates(trainer_url: str, generator_urls: list[str]) -> dict[str, Any]:
    """The planner's ``trainer_rate`` and ``generator_rate`` (per GPU) of a live run, and what they came from."""
    trainer = trainer_live(trainer_url)
    generators = {url: generator_live(url) for url in generator_urls}
    images = sum(g["images"] for g in generators.values())
    seconds = sum(g["gen_seconds"] for g in generators.values())
    if images <= 0 or seconds <= 0:
        raise ValueError(f"plan: the generators at {', '.join(generator_urls)} have generated nothing yet")
    return {"trainer_rate": trainer["trainer_rate"], "generator_rate": images / seconds, "trainer": trainer,
            "generators": generators, "generator_workers": int(sum(g["workers"] for g in generators.values()))}


def advise(live: dict[str, Any], generators_per_trainer: float, trainer_gpus: int) -> dict[str, Any]:
    """Which side to grow, and by how many GPUs (module docstring), from the planner's ratio ``k*``."""
    workers = live["generator_workers"]
    needed = math.ceil(generators_per_trainer * trainer_gpus - 1e-9)
    fed = math.floor(workers / generators_per_trainer + 1e-9)
    if workers < needed:
        grow, by = "generators", needed - workers
    elif fed > trainer_gpus:
        grow, by = "trainer", fed - trainer_gpus
    else:
        grow, by = "neither", 0
    return {"grow": grow, "by_gpus": by, "generator_gpus_now": workers, "generator_gpus_needed": needed,
            "trainer_gpus_now": trainer_gpus, "trainer_gpus_fed": fed,
            "trainer_stall_ratio": live["trainer"]["stall_ratio"],
            "generator_idle_ratio": {url: g["idle_ratio"] for url, g in live["generators"].items()}}


def advice_line(advice: dict[str, Any]) -> str:
    """One line for the table: what the live run measured and which side to grow."""
    idle = ", ".join(f"{v:.0%}" for v in advice["generator_idle_ratio"].values())
    measured = (f"live: trainer stall {advice['trainer_stall_ratio']:.0%}, generator idle {idle}; "
                f"{advice['generator_gpus_now']} generator GPU(s) for {advice['trainer_gpus_now']} trainer GPU(s)")
    if advice["grow"] == "generators":
        return f"{measured} -> grow the generators by {advice['by_gpus']} GPU(s) (to {advice['generator_gpus_needed']})"
    if advice["grow"] == "trainer":
        return (f"{measured} -> grow the trainer by {advice['by_gpus']} GPU(s) (the generators feed "
                f"{advice['trainer_gpus_fed']})")
    return f"{measured} -> balanced: grow neither"
