"""The trainer's data order (mdu_dist.trainer.epoch_order / step_indices), with and without grouping by length,
checked against what it must be: every kept row once per epoch, the same dropped rows, steps of similar
length, fewer padding positions, reproducible per (seed, epoch), DP ranks partitioning each step."""

from __future__ import annotations

import random

import pytest

from mdu_dist.trainer import epoch_order, step_indices


def _lengths(n: int, seed: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(3, 8), rng.randint(40, 120)]) for _ in range(n)]


@pytest.mark.parametrize("n, group", [(88, 8), (68, 8), (20, 8), (24, 4)])
def test_grouped_epoch_keeps_the_rows_and_the_dropped_ones(n, group):
    lengths = _lengths(n)
    for epoch in range(5):
        plain, grouped = epoch_order(n, 7, epoch), epoch_order(n, 7, epoch, group, lengths)
        used = n - n % group
        assert sorted(grouped) == list(range(n))
        assert grouped[used:] == plain[used:]  # the dropped rows are the random order's, as without grouping
        steps = [grouped[i: i + group] for i in range(0, used, group)]
        # Steps cut from the length-sorted rows: no step's length range overlaps another's inside.
        spans = sorted((min(lengths[i] for i in s), max(lengths[i] for i in s)) for s in steps)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
        assert grouped == epoch_order(n, 7, epoch, group, lengths)  # reproducible


def test_grouping_cuts_padding_and_still_shuffles():
    n, group, lengths = 88, 8, _lengths(88)

    def padded(order):
        return sum(group * max(lengths[i] for i in order[s: s + group]) for s in range(0, n - n % group, group))

    plain = sum(padded(epoch_order(n, 0, e)) for e in range(20))
    grouped = sum(padded(epoch_order(n, 0, e, group, lengths)) for e in range(20))
    assert grouped < 0.75 * plain, (grouped, plain)
    firsts = {tuple(epoch_order(n, 0, e, group, lengths)[:group]) for e in range(20)}
    assert len(firsts) > 5  # the steps' order changes from epoch to epoch


def test_dp_ranks_partition_a_grouped_step():
    n, lengths = 40, _lengths(40)
    for step in range(12):
        ranks = [step_indices(n, 1, step, 4, r, 2, lengths) for r in range(2)]
        epoch = ranks[0][0]
        order = epoch_order(n, 1, epoch, 8, lengths)
        within = step - epoch * (n // 8)
        assert ranks[0][1] + ranks[1][1] == order[within * 8: within * 8 + 8]


def test_grouping_is_refused_with_pad_in_response():
    from mdu_dist.data import DataConfig
    from mdu_dist.errors import ConfigError

    DataConfig(group_by_length=True).validate()
    with pytest.raises(ConfigError, match="data.group_by_length=true with data.pad_in_response=true"):
        DataConfig(group_by_length=True, pad_in_response=True).validate()
