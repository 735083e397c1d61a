"""Leave-one-out batches and TAPE indices on hand-made sequences with same-day ties."""

from __future__ import annotations

import numpy as np

from model.recall.data import MIXED, START, make_batch, query_transition, tape_indices
from tests.recall.conftest import toy_sequence


def code(prev: int, dom: int) -> int:
    return prev * 2 + dom


def test_tape_indices_with_ties() -> None:
    # day 1: a, a, b (mixed day); day 2: a; day 3: b, b; day 4: b
    doms = np.array([0, 0, 1, 0, 1, 1, 1])
    ts = np.array([1, 1, 1, 2, 3, 3, 4])
    step, dom_step, trans = tape_indices(doms, ts)
    assert step.tolist() == [0, 0, 0, 1, 2, 2, 3]
    assert dom_step.tolist() == [0, 0, 0, 1, 1, 1, 2]  # earlier days on which the item's own domain appeared
    assert trans.tolist() == [code(START, 0), code(START, 0), code(START, 1), code(MIXED, 0), code(0, 1),
                              code(0, 1), code(1, 1)]


def test_tape_indices_ignore_the_order_within_a_day() -> None:
    doms, ts = np.array([0, 1, 0, 1, 0]), np.array([5, 5, 5, 9, 9])
    perm = np.array([2, 1, 0, 4, 3])  # a permutation inside each day
    a, b = tape_indices(doms, ts), tape_indices(doms[perm], ts[perm])
    for x, y in zip(a, b, strict=True):
        assert x[perm].tolist() == y.tolist()


def test_query_transition_reads_the_last_day_as_a_set() -> None:
    assert query_transition(np.array([0, 1]), np.array([3, 3]), 1) == code(MIXED, 1)
    assert query_transition(np.array([1, 0]), np.array([2, 3]), 1) == code(0, 1)
    assert query_transition(np.array([], dtype=int), np.array([], dtype=int), 0) == code(START, 0)


def test_leave_one_out_splits(toy_catalog) -> None:
    seq = toy_sequence(toy_catalog, [1, 21, 2, 22, 3, 23], [1, 1, 2, 3, 4, 5])
    train = make_batch([seq], max_len=50, cut=2)
    assert train.items[0].tolist() == [1, 21, 2]  # the last two items are never inputs or targets
    assert train.targets[0].tolist() == [21, 2, 22]
    assert train.target_doms[0].tolist() == [1, 0, 1]
    valid = make_batch([seq], max_len=50, cut=1, only_last=True)
    assert valid.items[0].tolist() == [1, 21, 2, 22] and valid.targets[0].tolist() == [0, 0, 0, 3]
    test = make_batch([seq], max_len=50, cut=0, only_last=True)
    assert test.items[0].tolist() == [1, 21, 2, 22, 3] and test.targets[0, -1] == 23
    short = make_batch([seq], max_len=2, cut=0, only_last=True)  # only the last max_len inputs are kept
    assert short.items[0].tolist() == [22, 3] and short.step[0].tolist() == [0, 1]
