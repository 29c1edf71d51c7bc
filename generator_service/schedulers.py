"""Scheduler names accepted by the diffusers backend.

This table is plain data (no diffusers import) so that `GeneratorConfig` can validate a scheduler
name before any model is loaded. Each name maps to a diffusers scheduler class name and the keyword
overrides given to `SchedulerClass.from_config(pipe.scheduler.config, **overrides)`.

"default" keeps the scheduler the pipeline was saved with.
"""

from __future__ import annotations

SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm-single": ("DPMSolverSinglestepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

DEFAULT_SCHEDULER_NAME = "default"
SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT_SCHEDULER_NAME, *SCHEDULERS)
