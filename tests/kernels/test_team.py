"""The thread team of a decode step's layers (kernels/csrc/team.h): its loops split work as
at::parallel_for does, on the team's threads, and an error on any of them reaches the caller
without leaving the team stuck."""

from __future__ import annotations

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
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


SPLITS = [(1, 1), (2, 1), (7, 1), (64, 16), (64, 40), (15, 16), (999, 3)]  # (n, grain)


@pytest.mark.parametrize("n, grain", SPLITS)
def test_a_team_splits_loops_as_at_parallel_for_does(probe, two_threads, n, grain):
    """Chunk t on thread t, chunks of ceil(n / parts), parts = min(threads, ceil(n / grain)); the
    second of two loops in one team (the team serves one loop after another)."""
    on_team, plain = probe(n, grain, True, -1), probe(n, grain, False, -1)
    assert (on_team >= 0).all()  # every item ran
    assert torch.equal(on_team, plain)
    parts = min(2, -(-n // grain))
    assert on_team.unique().tolist() == list(range(parts))


def test_one_thread_runs_every_item_on_the_caller(probe):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(probe(9, 1, True, -1), torch.zeros(9, dtype=torch.long))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fail", [0, 9])  # thread 0's chunk (the caller), thread 1's
def test_an_error_on_any_thread_of_a_team_reaches_the_caller(probe, two_threads, fail):
    with pytest.raises(RuntimeError, match=f"item {fail} raised on thread {fail // 5}"):
        probe(10, 1, True, fail)
    # the team is gone and the next one works
    assert torch.equal(probe(10, 1, True, -1), probe(10, 1, False, -1))
