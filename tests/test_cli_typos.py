"""A mistyped flag or subcommand in any stablerep CLI: exit 2, one line on stderr, "did you mean"."""
from __future__ import annotations

import pytest

from benchmarks.cli import main as bench_main
from generator_service.cli import main as generator_main
from trainer.cli import main as train_main
from trainer.eval.cli import main as eval_main


def exit_status(main, argv) -> int:
    """The status a console script would exit with: ``main``'s return value or its ``SystemExit``."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("main, argv, prog, want", [
    (train_main, ["--preset", "cpu_small", "--stpes", "3"], "stablerep-train", "--stpes (did you mean --steps?)"),
    (train_main, ["--preset", "cpu_small", "--resmue=auto"], "stablerep-train", "--resmue (did you mean --resume?)"),
    (train_main, ["--method", "stablerp"], "stablerep-train", "did you mean 'stablerep'?"),
    (generator_main, ["--captoins", "c.txt"], "stablerep-generator", "--captoins (did you mean --captions?)"),
    (generator_main, ["captions", "--n", "3", "--ot", "x.txt"], "stablerep-generator captions",
     "--ot (did you mean --out?)"),
    (generator_main, ["probe-set", "--out", "x", "--atribute", "shape"], "stablerep-generator probe-set",
     "--atribute (did you mean --attribute?)"),
    (eval_main, ["linear", "--checkpoint", "x", "--train", "a", "--val", "b", "--batchsize", "3"],
     "stablerep-eval linear", "--batchsize (did you mean --batch-size?)"),
    (eval_main, ["fewshots", "--checkpoint", "x"], "stablerep-eval", "did you mean 'fewshot'?"),
    (bench_main, ["transport", "--quik"], "stablerep-bench transport", "--quik (did you mean --quick?)"),
    (bench_main, ["transprt", "--quick"], "stablerep-bench", "did you mean 'transport'?"),
])
def test_typos_are_one_line_with_a_suggestion(main, argv, prog, want, capsys):
    assert exit_status(main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: ") and want in err[0] and f"(see {prog} --help)" in err[0], err[0]


def test_an_unknown_flag_like_nothing_known_gets_no_guess(capsys):
    assert exit_status(train_main, ["--preset", "cpu_small", "--zzzzqqq", "1"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized argument --zzzzqqq" in err and "did you mean" not in err
