"""One syntax for --model-kwargs in train, eval and bench; eval's default workers fit the cores."""
from __future__ import annotations

import os

import pytest

from benchmarks.cli import build_parser as bench_parser
from trainer.cli import parse_config
from trainer.eval.cli import build_parser as eval_parser
from trainer.eval.cli import default_workers
from trainer.kwargs_arg import merge_kwargs


@pytest.mark.parametrize("tokens", [["depth=2", "patch_size=8"], ['{"depth": 2, "patch_size": 8}']])
def test_model_kwargs_read_the_same_in_train_eval_and_bench(tokens):
    want = {"depth": 2, "patch_size": 8}
    cfg, _ = parse_config(["--preset", "cpu_small", "--generators", "tcp://127.0.0.1:5555", "--model-kwargs", *tokens])
    assert cfg.model.model_kwargs == {**cfg_preset_kwargs(), **want}  # merged over the preset's map
    args = eval_parser().parse_args(["linear", "--checkpoint", "timm:vit_tiny_patch16_224", "--train", "a",
                                     "--val", "b", "--model-kwargs", *tokens])
    assert merge_kwargs(args.model_kwargs) == want
    args = bench_parser().parse_args(["trainer", "--model-kwargs", *tokens])
    assert merge_kwargs(args.model_kwargs) == want


def cfg_preset_kwargs() -> dict:
    from trainer.config import build_config

    return dict(build_config("cpu_small", validate=False).model.model_kwargs)


def test_bad_model_kwargs_are_refused_by_every_parser(capsys):
    for parse in (lambda: parse_config(["--model-kwargs", "depth"]),
                  lambda: eval_parser().parse_args(["fewshot", "--checkpoint", "x", "--data", "d", "--model-kwargs", "{1"]),
                  lambda: bench_parser().parse_args(["trainer", "--model-kwargs", "[1]"])):
        with pytest.raises(SystemExit) as exc:
            parse()
        assert exc.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_eval_default_workers_never_exceed_the_usable_cores():
    cores = len(os.sched_getaffinity(0))
    assert 1 <= default_workers() <= min(4, cores)
    args = eval_parser().parse_args(["fewshot", "--checkpoint", "x", "--data", "d"])
    assert args.workers == default_workers()
