"""
What the differential tests (C{tests.test_differential_*}) share: seeded
cases, each run two ways (a fast path on and off), their outcomes (dicts)
compared key by key; and a monkey patch applied around one run.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.python.monkey import MonkeyPatcher
from twisted.trial.unittest import SynchronousTestCase


def patched(patcher: MonkeyPatcher, f: Callable[..., Any], *args: Any) -> Any:
    """
    C{f(*args)} with C{patcher}'s patches applied, restored after it.
    """
    patcher.patch()
    try:
        return f(*args)
    finally:
        patcher.restore()


def both_ways(make_patcher: Callable[[], MonkeyPatcher], f: Callable[..., Any],
              *args: Any) -> list[tuple[bool, Any]]:
    """
    C{f(*args)} as it is and patched by C{make_patcher()}: C{(False,
    outcome)} and C{(True, outcome)}.
    """
    return [(False, f(*args)), (True, patched(make_patcher(), f, *args))]


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """
    The first key whose value differs between the outcomes C{a} and C{b}
    (which differ).
    """
    for k in a:
        if k not in b or a[k] != b[k]:
            return k
    return next(k for k in b if k not in a)


def check_seeded(test: SynchronousTestCase, seed: int, count: int,
                 make_case: Callable[[random.Random], Any],
                 run_pair: Callable[[Any], tuple[dict[str, Any], dict[str, Any]]],
                 describe: Callable[[int, int, str, Any, Any, Any], str]) -> None:
    """
    C{count} cases made by C{make_case} from a generator seeded with
    C{seed}, each run both ways by C{run_pair}: the two outcomes must be
    equal; the first that differs fails C{test} with C{describe(seed,
    index, key, value, other value, case)}.
    """
    rnd = random.Random(seed)
    for i in range(count):
        case = make_case(rnd)
        one, other = run_pair(case)
        if one != other:
            k = first_difference(one, other)
            test.fail(describe(seed, i, k, one.get(k), other.get(k), case))
