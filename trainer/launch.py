"""How this process was launched, and the checks that make multi-process runs join one group.

``torchrun`` and ``accelerate launch --multi_gpu`` start N processes with ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. Accelerate joins them into
one process group only on an accelerator (NCCL) or when told ``cpu=True`` (gloo); on a machine
without a GPU and without ``--cpu`` it silently runs N independent single-process trainings. So:

* :func:`accelerator_cpu_flag` turns on the CPU (gloo) path whenever the launcher asked for several
  processes and no GPU is visible;
* :func:`check_single_launch` refuses ``accelerate launch --num_processes N --cpu`` (N > 1), whose
  CPU launcher starts one process only;
* :func:`check_joined` refuses a run whose process group is smaller than the launcher's world.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch


class LaunchError(RuntimeError):
    """The processes of a multi-process launch could not form one process group."""


@dataclass(frozen=True)
class LaunchEnv:
    """The launcher's view of this process (from the environment)."""

    world_size: int  # WORLD_SIZE (1 when not set)
    rank: int  # RANK
    local_rank: int  # LOCAL_RANK (-1 when not set)
    launcher: str  # "torchrun" (WORLD_SIZE set), "accelerate" (accelerate's simple launcher), "none"
    master: str | None  # MASTER_ADDR:MASTER_PORT when set


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ

    def _int(name: str, default: int) -> int:
        value = env.get(name, "")
        try:
            return int(value) if value != "" else default
        except ValueError as exc:
            raise LaunchError(f"environment variable {name}={value!r} is not an integer") from exc

    world = _int("WORLD_SIZE", 1)
    master = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '')}" if "MASTER_ADDR" in env else None
    if "WORLD_SIZE" in env:
        launcher = "torchrun"
    elif "ACCELERATE_USE_CPU" in env or "ACCELERATE_MIXED_PRECISION" in env:
        launcher = "accelerate"
    else:
        launcher = "none"
    return LaunchEnv(world_size=world, rank=_int("RANK", 0), local_rank=_int("LOCAL_RANK", -1),
                     launcher=launcher, master=master)


def check_single_launch(env: LaunchEnv) -> None:
    """Refuse accelerate's single-process CPU launcher when several processes were asked for.

    ``accelerate launch --num_processes N --cpu`` sets ``MASTER_ADDR``/``MASTER_PORT`` (only done for
    N > 1) but starts one process without ``WORLD_SIZE``: the user expects N ranks and gets one.
    """
    if env.launcher == "accelerate" and env.master is not None and env.world_size == 1:
        raise LaunchError(
            "accelerate launch started a single process although --num_processes > 1 was asked for: its --cpu "
            "launcher runs one process. Start CPU ranks with `torchrun --nproc_per_node N -m trainer.cli ...` or "
            "`accelerate launch --multi_gpu --num_processes N -m trainer.cli ... --cpu`"
        )


def accelerator_cpu_flag(cpu_requested: bool, env: LaunchEnv) -> bool:
    """``cpu`` for ``Accelerator``: as asked, or forced on for a multi-process launch without a GPU."""
    if cpu_requested:
        return True
    return env.world_size > 1 and not torch.cuda.is_available()


def check_joined(env: LaunchEnv, num_processes: int, process_index: int) -> None:
    """Stop when the launcher's ``WORLD_SIZE`` ranks did not form one group of that size."""
    if env.world_size > 1 and num_processes != env.world_size:
        raise LaunchError(
            f"the launcher started {env.world_size} processes (WORLD_SIZE={env.world_size}, RANK={env.rank}) but "
            f"this one joined a process group of {num_processes}: check MASTER_ADDR/MASTER_PORT ({env.master}), "
            "that every node runs the same command, and pass --cpu on machines without a GPU"
        )
    if env.world_size > 1 and process_index != env.rank:
        raise LaunchError(f"process has rank {process_index} in the group but RANK={env.rank} from the launcher")


def backend_name() -> str:
    """The process group's backend ("gloo", "nccl", ...) or "single process" without a group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return "single process"


#: the floor of the collective timeout: torch's own NCCL default (10 minutes)
MIN_COLLECTIVE_TIMEOUT_S = 600.0
#: headroom on top of the longest wait a rank may spend outside collectives before its first step
COLLECTIVE_TIMEOUT_MARGIN_S = 120.0


def collective_timeout_s(connect_timeout: float, sample_timeout: float) -> float:
    """Seconds a collective may wait for the slowest rank.

    The first step waits until every rank has drawn its first batch: a rank served first sits in the
    all-reduce while the others still connect (``connect_timeout``) and fill their buffers (up to
    ``sample_timeout``; the paper batch needs thousands of images first). The process group's
    timeout must cover that wait, else the NCCL watchdog kills the ranks that were served first.
    """
    return max(MIN_COLLECTIVE_TIMEOUT_S, float(connect_timeout) + float(sample_timeout) + COLLECTIVE_TIMEOUT_MARGIN_S)


def fresh_accelerator_state() -> None:
    """Forget Accelerate's process-wide state of an earlier ``Accelerator`` in this process.

    ``Accelerator(mixed_precision=...)`` refuses a second precision once ``AcceleratorState`` exists
    ("AcceleratorState has already been initialized"), so a second training in one process (a test
    suite, a study that trains at two precisions) must start from a fresh state. The process-level
    ``PartialState`` (device, process group) is kept: a multi-process launch keeps its group.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
