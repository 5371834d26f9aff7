from __future__ import annotations

import itertools

import pytest
import torch

from cdlm.data.loader import ResumableLoader
from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch


def make_rows(n: int = 10, length: int = 3) -> TokenBatch:
    ids = torch.arange(n)[:, None].repeat(1, length)  # row r holds r everywhere
    return TokenBatch(ids, torch.ones(n, length, dtype=torch.bool), torch.zeros(n, length, dtype=torch.bool))


def first_col(batches: list[TokenBatch]) -> list[list[int]]:
    return [b.ids[:, 0].tolist() for b in batches]


def take(loader: ResumableLoader, n: int) -> list[TokenBatch]:
    return list(itertools.islice(loader, n))


def test_epochs_are_seeded_permutations_with_drop_last() -> None:
    loader = ResumableLoader(make_rows(10), 3, seed=7)
    assert loader.batches_per_epoch == 3
    epochs = [sum(first_col(take(loader, 3)), []) for _ in range(3)]
    assert all(len(set(e)) == 9 for e in epochs)  # 9 distinct rows, the 10th dropped
    assert epochs[0] != epochs[1]
    assert first_col(take(ResumableLoader(make_rows(10), 3, seed=7), 3)) == [epochs[0][i : i + 3] for i in (0, 3, 6)]
    assert loader.state_dict() == {"epoch": 3, "position": 0}


def test_resume_replays_exactly_across_epochs() -> None:
    straight = first_col(take(ResumableLoader(make_rows(10), 3, seed=1), 8))
    first = ResumableLoader(make_rows(10), 3, seed=1)
    head = first_col(take(first, 2))
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 2}
    resumed = ResumableLoader(make_rows(10), 3, seed=1)
    resumed.load_state_dict(state)
    assert head + first_col(take(resumed, 6)) == straight


def test_batches_carry_all_fields() -> None:
    rows = make_rows(4)
    rows = TokenBatch(rows.ids, rows.ids % 2 == 0, rows.ids % 3 == 0)
    (batch,) = take(ResumableLoader(rows, 4, seed=0), 1)
    assert torch.equal(batch.mask, batch.ids % 2 == 0) and torch.equal(batch.cond_mask, batch.ids % 3 == 0)


def test_shards_are_disjoint_and_in_lockstep() -> None:
    shards = [ResumableLoader(make_rows(11), 2, seed=3, process_index=r, num_processes=2) for r in range(2)]
    assert [s.batches_per_epoch for s in shards] == [2, 2]
    seen = [sum(first_col(take(s, 2)), []) for s in shards]
    assert not set(seen[0]) & set(seen[1])
    together = sum(first_col(take(ResumableLoader(make_rows(11), 4, seed=3), 2)), [])  # the same 8 rows
    assert sorted(seen[0] + seen[1]) == sorted(together)


def test_too_few_rows_and_bad_state() -> None:
    with pytest.raises(DataError, match="train.batch_size=4 on each of 2 process"):
        ResumableLoader(make_rows(7), 4, seed=0, num_processes=2)
    loader = ResumableLoader(make_rows(10), 3, seed=0)
    with pytest.raises(DataError, match="does not fit this loader"):
        loader.load_state_dict({"epoch": 0, "position": 3})
