"""A teardown step past its limit is logged with what it waits on and left behind; the stop goes
on (coordinator/bounded_stop.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from coordinator.bounded_stop import step


async def waits_for_an_answer_that_never_comes(never: asyncio.Event) -> None:
    await never.wait()


async def shrugs_off_cancellation(never: asyncio.Event) -> None:
    while not never.is_set():
        try:
            await never.wait()
        except asyncio.CancelledError:
            continue


def test_a_step_that_ends_is_awaited_and_its_error_raised():
    async def main() -> None:
        assert await step("quick", asyncio.sleep(0.01), 5.0)

        async def fails() -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await step("failing", fails(), 5.0)

    asyncio.run(main())


@pytest.mark.parametrize("stuck", [waits_for_an_answer_that_never_comes, shrugs_off_cancellation])
def test_a_stuck_step_is_logged_with_its_stack_and_left_behind(caplog, stuck):
    caplog.set_level(logging.ERROR, logger="tandem.launch")

    async def main() -> None:
        never = asyncio.Event()
        # the step waits on a task of its own, as aclose() awaits its loops
        inner = asyncio.ensure_future(stuck(never))

        async def close() -> None:
            await inner

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert not await step("closing the thing", close(), 0.3)
        assert loop.time() - t0 < 2.0
        if stuck is waits_for_an_answer_that_never_comes:
            await asyncio.sleep(0)  # the cancellation reaches it
            assert inner.cancelled() or inner.done()
        else:
            assert not inner.done()  # it is still there, and the stop went on
            never.set()  # (it ends, so that asyncio.run can)
            await inner

    asyncio.run(asyncio.wait_for(main(), 10))
    (record,) = [r for r in caplog.records if "did not finish" in r.getMessage()]
    text = record.getMessage()
    assert "closing the thing did not finish in 0 s" in text
    assert stuck.__name__ in text  # the stuck task's stack names where it waits


def test_deployment_shutdown_goes_past_a_stuck_close(caplog, monkeypatch):
    """``tandem serve``'s teardown (coordinator.launch.Deployment.shutdown) takes its steps
    through ``step``: a client whose close never ends does not keep the streams open."""
    from coordinator import launch

    monkeypatch.setattr(launch, "STEP_TIMEOUT_S", 0.2)
    caplog.set_level(logging.ERROR, logger="tandem.launch")
    closed: list[str] = []

    class Closes:
        def __init__(self, name: str, stuck: bool = False) -> None:
            self.name, self.stuck = name, stuck

        async def aclose(self) -> None:
            if self.stuck:
                await asyncio.Event().wait()
            closed.append(self.name)

    class NoWorkers(Closes):
        pool = type("Pool", (), {"workers": {}})()

        def every_actor(self) -> list:
            return []

    deployment = launch.Deployment(Closes("client", stuck=True), None, Closes("stream"),
                                   NoWorkers("supervisor"), Closes("events"))  # fmt: skip
    asyncio.run(asyncio.wait_for(deployment.shutdown(), 10))
    assert closed == ["supervisor", "stream", "events"]
    assert any("closing the client did not finish" in r.getMessage() for r in caplog.records)
