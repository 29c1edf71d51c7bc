"""The replay buffer's rate contract, counted (no timing): a draw waits while draws + G > R x inserts + E."""
from __future__ import annotations

import threading

import pytest

from trainer.data.config import ReplayConfig
from trainer.data.replay import ReplayBuffer
from tests.test_replay import H, P, W, make_group

G = 2  # groups per batch


class WatchedContract:
    """The buffer's own contract, with every check it makes recorded as (inserts, allowed) and announced."""

    def __init__(self, contract, checks: list, announce: threading.Condition) -> None:
        self.contract, self.checks, self.announce = contract, checks, announce

    def allows(self, draws: int, batch: int, inserts: int) -> bool:
        allowed = self.contract.allows(draws, batch, inserts)
        with self.announce:
            self.checks.append((inserts, allowed))
            self.announce.notify_all()
        return allowed

    def __getattr__(self, name):  # the rest as the contract itself
        return getattr(self.contract, name)


def test_a_draw_blocks_at_the_contract_and_exactly_enough_inserts_release_it():
    buffer = ReplayBuffer(32, P, H, W, policy=ReplayConfig(samples_per_insert=0.5, spi_tolerance=2))
    for caption in range(4):
        buffer.add(make_group(caption))
    # 0.5 x 4 inserts + 2 = 4 draws: two batches of 2 go at once, the third would make 6
    buffer.sample(G, 1, timeout=0)
    buffer.sample(G, 1, timeout=0)
    with pytest.raises(TimeoutError, match=r"rate contract .*4 groups drawn and 4 inserted; 2 more draws need 4 more"):
        buffer.sample(G, 1, timeout=0)
    assert buffer.stats()["rate_limited_batches"] == 1 and buffer.stats()["draws"] == 4

    checks: list[tuple[int, bool]] = []
    announce = threading.Condition()
    buffer.contract = WatchedContract(buffer.contract, checks, announce)
    stall_before = buffer.stats()["stall_seconds"]
    drawn = threading.Event()
    sampler = threading.Thread(target=lambda: (buffer.sample(G, 1), drawn.set()), daemon=True)
    sampler.start()

    def last_check_at(inserts: int) -> bool:
        """What the sampler's last check with ``inserts`` inserts found (waits until it made one)."""
        with announce:
            assert announce.wait_for(lambda: any(i == inserts for i, _ in checks), timeout=60)
            return [allowed for i, allowed in checks if i == inserts][-1]

    assert last_check_at(4) is False
    for caption in range(4, 7):  # 5, 6, 7 inserts: 0.5 x 7 + 2 = 5.5 < 6 draws
        buffer.add(make_group(caption))
        assert last_check_at(caption + 1) is False
        assert not drawn.is_set() and buffer.stats()["samplers_waiting"] == 1
    buffer.add(make_group(7))  # the 8th insert: 0.5 x 8 + 2 = 6 draws allowed
    sampler.join(60)
    assert drawn.is_set() and last_check_at(8) is True
    stats = buffer.stats()
    assert stats["draws"] == 6 and stats["rate_limited_batches"] == 2
    assert stats["stall_seconds"] > stall_before  # the wait counts as stall


def test_without_a_contract_draws_wait_for_groups_only():
    buffer = ReplayBuffer(8, P, H, W)
    assert buffer.contract is None
    for caption in range(2):
        buffer.add(make_group(caption))
    for _ in range(5):  # the same two groups, again and again
        buffer.sample(G, 1, timeout=0)
    assert buffer.stats()["draws"] == 10 and buffer.stats()["rate_limited_batches"] == 0
