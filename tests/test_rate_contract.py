"""The rate contract's arithmetic: a batch of G draws when draws + G <= R x inserts + E."""
from __future__ import annotations

import pytest

from trainer.data.rate_contract import RateContract


@pytest.mark.parametrize("r, e", [(1, 0), (2, 4), (0.5, 1), (4, 0.5), (0.25, 0)])
def test_a_batch_is_allowed_exactly_when_its_draws_fit(r, e):
    contract = RateContract(r, e)
    for inserts in range(12):
        for draws in range(0, 30):
            for batch in (1, 3):
                fits = draws + batch <= r * inserts + e
                assert contract.allows(draws, batch, inserts) == fits, (draws, batch, inserts)
                needed = contract.inserts_needed(draws, batch, inserts)
                assert contract.allows(draws, batch, inserts + needed)
                assert needed == 0 or not contract.allows(draws, batch, inserts + needed - 1)


def test_counted_by_hand():
    contract = RateContract(samples_per_insert=2, tolerance=1)
    # 3 groups drawn per batch: after 2 inserts, 2 * 2 + 1 = 5 draws are allowed: one batch (3), not two (6)
    assert contract.allows(0, 3, 2) and not contract.allows(3, 3, 2)
    assert contract.inserts_needed(3, 3, 2) == 1  # 2 * 3 + 1 = 7 >= 6
    assert contract.inserts_needed(6, 3, 3) == 1  # 9 draws: 2 * 4 + 1 = 9 is enough, 2 * 3 + 1 = 7 is not
    assert contract.allows(6, 3, 4) and not contract.allows(6, 3, 3)


@pytest.mark.parametrize("r, e, match", [(0, 0, "samples_per_insert"), (-1, 0, "samples_per_insert"),
                                         (float("inf"), 0, "samples_per_insert"), (1, -0.5, "tolerance"),
                                         (True, 0, "samples_per_insert")])
def test_bad_values_are_refused(r, e, match):
    with pytest.raises(ValueError, match=match):
        RateContract(r, e)
