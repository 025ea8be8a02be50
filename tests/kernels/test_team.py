"""The thread team of a decode step's layers (kernels/csrc/team.h): its loops split work as
at::parallel_for does, on the team's threads, and an error on any of them reaches the caller
without leaving the team stuck."""

from __future__ import annotations

import os

import pytest
import torch

from kernels import cpu_ext


@pytest.fixture(scope="module")
def probe():
    built = cpu_ext.load_ops()
    assert built is not None, f"C++ extension did not build: {cpu_ext._failed}"
    return built.team_probe


@pytest.fixture
def two_threads():
    if len(os.sched_getaffinity(0)) < 2 or os.environ.get("OMP_PROC_BIND"):
        pytest.skip("a team of two needs two CPUs to run on, unpinned")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


SPLITS = [(1, 1), (2, 1), (7, 1), (64, 16), (64, 40), (15, 16), (999, 3)]  # (n, grain)


@pytest.mark.parametrize("n, grain", SPLITS)
def test_a_team_splits_loops_as_at_parallel_for_does(probe, two_threads, n, grain):
    """Chunk t on thread t, chunks of ceil(n / parts), parts = min(threads, ceil(n / grain)); the
    second of two loops in one team (the team serves one loop after another)."""
    *on_team, size = probe(n, grain, True, -1).tolist()
    *plain, none = probe(n, grain, False, -1).tolist()
    assert (size, none) == (2, 0)  # the first loops ran in a team of two, the others not
    assert min(on_team) >= 0  # every item ran
    assert on_team == plain
    parts = min(2, -(-n // grain))
    assert sorted(set(on_team)) == list(range(parts))


def test_one_thread_runs_every_item_on_the_caller(probe):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert probe(9, 1, True, -1).tolist() == [0] * 9 + [0]  # and in no team
    finally:
        torch.set_num_threads(threads)


def test_no_team_where_its_threads_outnumber_the_cpus(probe, two_threads):
    """Two threads allowed one CPU: no team (its members would spin on the CPU of the thread they
    wait for); the loops still run, split as always."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        *items, size = probe(10, 1, True, -1).tolist()
    finally:
        os.sched_setaffinity(0, cpus)
    assert size == 0 and items == probe(10, 1, False, -1).tolist()[:-1]


@pytest.mark.parametrize("fail", [0, 9])  # thread 0's chunk (the caller), thread 1's
def test_an_error_on_any_thread_of_a_team_reaches_the_caller(probe, two_threads, fail):
    with pytest.raises(RuntimeError, match=f"item {fail} raised on thread {fail // 5}"):
        probe(10, 1, True, fail)
    # the team is gone and the next one works
    assert probe(10, 1, True, -1).tolist()[:-1] == probe(10, 1, False, -1).tolist()[:-1]
