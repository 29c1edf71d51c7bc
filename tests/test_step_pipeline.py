"""Prefetch and deferred loss checks of the training step (trainer/step_pipeline.py), and the loop using them."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.polling import wait_for
from tests.test_train_loop import shards, tiny_config  # noqa: F401  (module fixture)
from trainer.data.batch import Batch
from trainer.loop import NonFiniteLossError, train
from trainer.data.sources.generator_watch import GeneratorsSilentError
from trainer.step_pipeline import LossLedger, Prefetcher


class CountingSource:
    """A real in-memory source: batch k holds the value k; its state is the number of batches drawn."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.drawn, self.fail_at = 0, fail_at

    def next_batch(self) -> Batch:
        self.drawn += 1
        if self.drawn == self.fail_at:
            raise GeneratorsSilentError("every generator silent")
        images = torch.full((2, 1, 4, 4, 3), self.drawn, dtype=torch.uint8)
        return Batch(images=images, caption_ids=torch.tensor([2 * self.drawn, 2 * self.drawn + 1]), captions=["a", "b"])

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}


def test_prefetcher_draws_the_next_batch_while_the_step_runs_and_saves_the_taken_state():
    source = CountingSource()
    prefetch = Prefetcher(source, torch.device("cpu"))
    try:
        first = prefetch.next()
        assert int(first.images[0, 0, 0, 0, 0]) == 1
        assert wait_for(lambda: source.drawn == 2, "batch 2 drawn ahead")  # no second next() call yet
        assert prefetch.state_dict() == {"drawn": 1}  # one batch taken: the one drawn ahead is not counted
        second = prefetch.next()
        assert int(second.images[0, 0, 0, 0, 0]) == 2 and second.caption_ids.tolist() == [4, 5]
        assert wait_for(lambda: source.drawn == 3, "batch 3 drawn ahead")
        assert prefetch.state_dict() == {"drawn": 2}
    finally:
        prefetch.close()


def test_prefetcher_raises_the_sources_error_at_the_batch_it_concerns():
    source = CountingSource(fail_at=2)
    prefetch = Prefetcher(source, torch.device("cpu"))
    try:
        assert int(prefetch.next().images.max()) == 1
        with pytest.raises(GeneratorsSilentError):
            prefetch.next()
        assert source.drawn == 2 and prefetch.state_dict() == {"drawn": 2}  # nothing drawn ahead after it
        assert int(prefetch.next().images.max()) == 3  # a later call draws again
    finally:
        prefetch.close()


def test_loss_ledger_reads_back_at_flush_and_finds_the_first_non_finite_step():
    ledger = LossLedger(first_step=10)
    for value in (1.0, 0.5):
        ledger.add(torch.tensor(value))
    assert ledger.values == [] and ledger.pending == 2  # nothing read back between checks
    assert ledger.flush() is None and ledger.values == [1.0, 0.5]
    for value in (0.25, math.inf, math.nan):
        ledger.add(torch.tensor(value))
    assert ledger.flush() == (14, math.inf)  # steps count from first_step + 1: the 4th loss is step 14
    assert ledger.pending == 0 and len(ledger.values) == 5


def test_non_finite_loss_between_check_steps_stops_at_the_next_check_naming_the_first_bad_step(shards, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    # lr 1e30 blows the weights up at the first update: the loss of step 2 is the first non-finite one.
    # Checks at log steps (every 4) and saves (every 3): step 2 is found at the check of step 3,
    # before step 3's update and before its checkpoint.
    cfg = tiny_config(shards, out, optim={"lr": 1e30}, schedule={"steps": 8, "warmup_steps": 0},
                      run={"log_every": 4, "save_every": 3})
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    assert err.value.step == 2 and "no checkpoint was written yet" in str(err.value)
    assert not (out / "checkpoints" / "last").exists()  # nothing saved past the bad step


def test_checkpoint_counts_only_batches_trained_on(shards, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    summary = train(tiny_config(shards, out, schedule={"steps": 5, "warmup_steps": 1}, run={"save_every": 2}))
    assert summary["steps"] == 5 and len(summary["losses"]) == 5 and all(map(math.isfinite, summary["losses"]))
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["source_state"]["counters"]["batches"] == 5 and state["loss"] == summary["losses"][-1]


def test_prefetcher_draws_nothing_past_its_limit():
    source = CountingSource()
    prefetch = Prefetcher(source, torch.device("cpu"), limit=2)
    try:
        prefetch.next()
        assert wait_for(lambda: source.drawn == 2, "batch 2 drawn ahead")
        prefetch.next()
    finally:
        prefetch.close()
    assert source.drawn == 2  # the thread has stopped: no third batch was drawn
