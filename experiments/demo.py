"""The embedded default, end to end on a CPU: ``stablerep-bench demo [--output DIR]`` (``make demo``).

It drives the generator service, the trainer and the evaluation together, so it lives above all
three (in benchmarks/, beside the study).

1. ``stablerep-generator captions`` writes procedural captions; ``stablerep-generator probe-set``
   writes held-out labelled ImageFolders (one per probed caption attribute, e.g. shape) whose image
   seeds the training stream never uses.
2. The procedural generator service starts as a subprocess serving protocol v1 on a free local port.
3. The real training loop (``trainer.loop.train``, online source, StableRep loss, ``small_cnn`` at 64 px)
   runs in this process; its monitor (trainer/monitor.py) scores the live backbone by weighted k-NN on
   every probe set at step 0 and every ``--probe-every`` steps (``OUTPUT/monitor.jsonl``: the curve).
4. The backbone at random init (step 0) and at the end get the fast linear probe on the probe sets
   (the headline numbers).
5. ``OUTPUT/report.json`` and ``OUTPUT/curve.png`` summarize the run; the generator is always stopped.

Ctrl-C / SIGTERM stop it where it is (exit 130, one line saying where) with a partial report marked
``"interrupted": true``; finished probes are kept, and ``--probes-only`` probes what is left
(experiments/demo_run.py). The phases themselves run in ``experiments.demo_run.DemoRun``.

Flags of this demo (all others go to ``stablerep-train`` on top of the ``demo`` preset,
trainer/presets/demo.yaml):
``--steps N``, ``--quick``, ``--probe-every N`` (the k-NN curve's cadence), ``--attributes shape,texture``,
``--captions N``,
``--probe-train-per-class N``, ``--probe-val-per-class N``, ``--generator-workers N``, ``--seed S``,
``--probes-only``. Both kinds are checked before any work.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.trainer_flags import BadFlags, parse_trainer_config
from infra.cli_parser import SuggestingParser

DEMO_PRESET = "demo"  # trainer/presets/demo.yaml: the demo's trainer settings (user flags override them)
GENERATOR_NICENESS = 10
GENERATOR_GROUPS_PER_S = 100  # about 2x what the demo's trainer draws on 2 cores
PROG = "stablerep-bench demo"
DEFAULT_OUTPUT = "runs/demo"
SNAPSHOTS = "snapshots"


@dataclass
class DemoPlan:
    """What one demo run does; ``--quick`` shrinks every part.

    The first attribute is the headline probe. With the demo preset (small_cnn, caption cells that
    differ only in shape or texture, weak augmentation; trainer/presets/demo.yaml) 2000 CPU steps
    learn colour, shape and texture well beyond the random init (benchmarks/RESULTS.md, "Demo: shape
    and texture learned contrastively"). The probes train on 400 images per class and score 100 per
    class: with 20 the selected classifier fits its training images perfectly and generalizes at
    chance, and with 100 the texture and shape probes read 5-7 points below what 400 show of the same
    backbone.
    """

    steps: int = 2000
    probe_every: int = 500
    attributes: tuple[str, ...] = ("colour", "background", "texture", "shape")
    captions: int = 576
    probe_train_per_class: int = 400
    probe_val_per_class: int = 100
    generator_workers: int = 1
    seed: int = 0
    probe_epochs: int = 100
    output: str | None = None
    probes_only: bool = False

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(steps=100, probe_every=50, attributes=("colour",), probe_train_per_class=20)


def parse_demo_args(argv: list[str]) -> tuple[DemoPlan, list[str]]:
    """Split ``argv`` into the demo's own flags (-> :class:`DemoPlan`) and flags for the trainer."""
    parser = SuggestingParser(prog="stablerep-bench demo", add_help=True,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "-o", help=f"run directory (default {DEFAULT_OUTPUT})")
    parser.add_argument("--quick", action="store_true", help="a shorter run (about a minute on 2 CPU cores)")
    parser.add_argument("--probes-only", action="store_true",
                        help="no training: probe the snapshots already in --output (after a stop; finished probes are kept)")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--probe-every", type=int, help="steps between k-NN evaluations of the training backbone (the curve)")
    parser.add_argument("--attributes", help="comma-separated caption attributes to probe; the first is the headline")
    parser.add_argument("--captions", type=int, help="procedural captions to train on (576 distinct)")
    parser.add_argument("--probe-train-per-class", type=int)
    parser.add_argument("--probe-val-per-class", type=int)
    parser.add_argument("--generator-workers", type=int, help="CPU workers of the generator service")
    parser.add_argument("--seed", type=int, help="seed of captions, probe sets, generator and trainer")
    args, rest = parser.parse_known_args(argv)
    plan = DemoPlan.quick() if args.quick else DemoPlan()
    plan.output = args.output
    for name in ("steps", "probe_every", "captions", "probe_train_per_class", "probe_val_per_class",
                 "generator_workers", "seed"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "seed" else 1):
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(plan, name, value)
    if args.attributes:
        plan.attributes = tuple(a.strip() for a in args.attributes.split(",") if a.strip())
        check_attributes(parser, plan.attributes)
    if args.steps is not None and args.probe_every is None:
        plan.probe_every = max(1, plan.steps // 4)
    plan.probes_only = args.probes_only
    return plan, rest


def check_attributes(parser: SuggestingParser, attributes: tuple[str, ...]) -> None:
    """``--attributes`` names procedural caption attributes only (checked before any work)."""
    from generator_service.procedural.grammar import ATTRIBUTES

    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        parser.error(f"--attributes: {', '.join(unknown) or 'none given'} (known: {', '.join(ATTRIBUTES)})")


GENERATOR_MODULE = "generator_service.cli"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _generator_env() -> dict[str, str]:
    """The subprocess environment: the project importable, one BLAS thread (the trainer needs the cores)."""
    env = dict(os.environ)
    if (PROJECT_ROOT / "generator_service").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def _lower_priority() -> None:
    """In the generator subprocess: yield the CPU to the trainer (the procedural backend renders far
    faster than a CPU trainer consumes, and the replay buffer absorbs the surplus)."""
    os.nice(GENERATOR_NICENESS)


def run_generator_cli(args: list[str], timeout: float = 300.0) -> str:
    """Run ``stablerep-generator ARGS`` to completion in a subprocess; its stdout, or an error with its stderr."""
    command = [sys.executable, "-m", GENERATOR_MODULE, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_generator_env())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def write_probe_sets(attributes: tuple[str, ...] | list[str], data: Path, train_per_class: int,
                     val_per_class: int, seed: int, reuse: bool = False) -> dict[str, Path]:
    """Labelled procedural probe folders ``data/probe_<attribute>/{train,val}/<class>/``, one per attribute.

    Attribute ``i`` gets seed ``seed + 1000 + i`` (so its images never equal a training image or another
    attribute's). ``reuse``: keep a folder that already has ``val/`` (the study scores many arms on
    one set); otherwise an old folder is replaced. Returns attribute -> folder.
    """
    folders: dict[str, Path] = {}
    for i, attribute in enumerate(attributes):
        folder = data / f"probe_{attribute}"
        folders[attribute] = folder
        if reuse and (folder / "val").is_dir():
            continue
        if folder.exists():
            shutil.rmtree(folder)
        run_generator_cli(["probe-set", "--out", str(folder), "--attribute", attribute,
                           "--train-per-class", str(train_per_class), "--val-per-class", str(val_per_class),
                           "--size", "64", "--seed", str(seed + 1000 + i)])
    return folders


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """``tcp://host:PORT`` with a port the OS just reported free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return f"tcp://{host}:{sock.getsockname()[1]}"


class GeneratorProcess:
    """The generator service as a subprocess (own process group, output to ``log_path``).

    Leaving the ``with`` block always stops it: SIGTERM (the service drains and exits), then after
    ``stop_timeout`` seconds SIGKILL to its whole process group (worker processes included).
    """

    def __init__(self, args: list[str], log_path: Path, stop_timeout: float = 20.0) -> None:
        self.command = [sys.executable, "-m", GENERATOR_MODULE, *args]
        self.log_path, self.stop_timeout = Path(log_path), stop_timeout
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.pid: int | None = None

    def __enter__(self) -> "GeneratorProcess":
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=_generator_env(), start_new_session=True,
                                         preexec_fn=_lower_priority if hasattr(os, "nice") else None)
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the generator service exited with status {self.proc.returncode}; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:  # the group: the service and any worker it left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(10)
            self.returncode = proc.returncode

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._log.close()


def copy_backbone(src_dir: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in ("backbone.json", "backbone.safetensors"):
        shutil.copy2(src_dir / name, dst_dir / name)
    return dst_dir


def export_initial_backbone(cfg, dst_dir: Path) -> Path:
    """The backbone ``train(cfg)`` starts from (same seed, same construction order), exported."""
    from accelerate.utils import set_seed

    from trainer.loop import build_components

    set_seed(cfg.run.seed)
    model = build_components(cfg)[0]
    model.export_backbone(dst_dir)
    return dst_dir


def _trainer_config(plan: DemoPlan, trainer_argv: list[str], endpoint: str, output: Path,
                    probe_dirs: dict[str, Path] | None = None):
    """``demo`` preset < the user's trainer flags < what the demo must set (source, length, output and,
    given ``probe_dirs``, the monitor: k-NN on every probe set every ``probe_every`` steps)."""
    from trainer.config import ConfigError

    argv = ["--preset", DEMO_PRESET, *trainer_argv,
            "--source", "online", "--generators", endpoint, "--output", str(output), "--steps", str(plan.steps),
            "--save-every", str(plan.probe_every), "--seed", str(plan.seed)]
    if probe_dirs:
        argv += ["--monitor-dirs", *map(str, probe_dirs.values()), "--monitor-every", str(plan.probe_every)]
    if "--log-with" not in trainer_argv:
        argv.append("--log-with")  # no trackers unless asked for
    if not any(a == "--resume" or a.startswith("--resume=") for a in trainer_argv):
        argv.append("--overwrite")  # a rerun of the demo replaces its run (its data/ stays)
    cfg, _ = parse_trainer_config(argv)
    if cfg.schedule.warmup_steps is not None and "--warmup-steps" not in trainer_argv:
        cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, max(0, plan.steps // 10))
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise BadFlags(str(exc)) from None


def run_demo(argv: list[str], output: str | None = None) -> int:
    """Run the demo (see module docstring); returns the exit status (0, 1 failed, 2 bad input, 130 stopped)."""
    plan, trainer_argv = parse_demo_args(list(argv))
    out = Path(output or plan.output or DEFAULT_OUTPUT)
    if plan.probes_only:
        from experiments.demo_run import run_probes_only

        return run_probes_only(plan, trainer_argv, out)
    try:  # every flag is checked before any work: the trainer's too
        _trainer_config(plan, trainer_argv, "tcp://127.0.0.1:1", out)
    except BadFlags as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from experiments.demo_run import DemoRun

    return DemoRun(plan, trainer_argv, out).run()


def _train(cfg, generator: GeneratorProcess, log) -> dict[str, Any]:
    """Build the online source and run ``trainer.loop.train``; its summary."""
    import torch

    from trainer.loop import build_source, train

    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.run.cpu else "cpu")
    source = None
    try:
        t0 = time.perf_counter()
        source = build_source(cfg, device=device, rank=0, world_size=1, local_captions=cfg.data.captions_per_step)
        connect_seconds = time.perf_counter() - t0
        log(f"training {cfg.model.name} {cfg.model.model_kwargs} with {cfg.method.name} for {cfg.schedule.steps} "
            f"steps of {cfg.data.captions_per_step} captions x {cfg.data.draw_per_caption} images")
        t0 = time.perf_counter()
        summary = train(cfg, source=source)
        summary["_train_seconds"] = time.perf_counter() - t0
        summary["_connect_seconds"] = connect_seconds
        generator.check_alive()
        return summary
    except ConnectionError as exc:
        raise ConnectionError(f"{exc}; generator log:\n{generator.log_tail()}") from exc
    finally:
        if source is not None:
            source.close()
