"""The embedded default, end to end on a CPU: ``stablerep-bench demo [--output DIR]`` (``make demo``).

It drives the generator service, the trainer and the evaluation together, so it lives above all
three (in experiments/, beside the study).

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
(experiments/demo_run.py). The phases themselves run in ``experiments.demo_run.DemoRun``; the plan
and the trainer config in experiments/demo_plan.py, the report in experiments/demo_report.py.

Flags of this demo (all others go to ``stablerep-train`` on top of the ``demo`` preset,
trainer/presets/demo.yaml, and the grammar's cell words, experiments/demo_preset.py):
``--steps N``, ``--quick``, ``--probe-every N`` (the k-NN curve's cadence), ``--attributes shape,texture``,
``--captions N``,
``--probe-train-per-class N``, ``--probe-val-per-class N``, ``--generator-workers N``, ``--seed S``,
``--probes-only``. Both kinds are checked before any work.
"""
from __future__ import annotations

import sys
from pathlib import Path

from experiments.demo_plan import DEFAULT_OUTPUT, PROG, demo_trainer_config, parse_demo_args
from experiments.trainer_flags import BadFlags


def run_demo(argv: list[str], output: str | None = None) -> int:
    """Run the demo (see module docstring); returns the exit status (0, 1 failed, 2 bad input, 130 stopped)."""
    plan, trainer_argv = parse_demo_args(list(argv))
    out = Path(output or plan.output or DEFAULT_OUTPUT)
    if plan.probes_only:
        from experiments.demo_run import run_probes_only

        return run_probes_only(plan, trainer_argv, out)
    try:  # every flag is checked before any work: the trainer's too
        demo_trainer_config(plan, trainer_argv, "tcp://127.0.0.1:1", out)
    except BadFlags as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from experiments.demo_run import DemoRun

    return DemoRun(plan, trainer_argv, out).run()
