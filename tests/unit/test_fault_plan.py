"""The fault-injection plan, exactly: which arrival fires, request targeting, and bad faults."""

from __future__ import annotations

import pytest

from engine.faults import Fault, FaultPlan, InjectedFault


def test_the_nth_arrival_fires_once_and_only_at_its_point():
    plan = FaultPlan()
    plan.arm(Fault("transfer", "drop", nth=3))
    assert plan.reach("step") is None  # another point does not count
    assert plan.reach("transfer") is None
    assert plan.reach("transfer") is None
    assert plan.reach("transfer") == Fault("transfer", "drop", nth=3)
    assert plan.reach("transfer") is None  # disarmed once fired


def test_one_fault_fires_per_arrival_and_raise_raises():
    plan = FaultPlan()
    plan.arm(Fault("step", "raise"))
    plan.arm(Fault("step", "raise"))
    with pytest.raises(InjectedFault, match="at step"):
        plan.reach("step")
    with pytest.raises(InjectedFault):
        plan.reach("step")  # the second one, on the next step
    assert plan.reach("step") is None


def test_a_targeted_fault_waits_for_its_requests_first_attempt():
    plan = FaultPlan()
    plan.arm(Fault("transfer", "fail", request_id="req-7"))
    assert plan.reach("transfer", ["req-1~0"]) is None
    assert plan.reach("transfer", ["req-7~1"]) is None  # a retry passes
    assert plan.reach("transfer", ["req-3~0", "req-7~0"]).action == "fail"
    plan.arm(Fault("step", "raise", request_id="req-7", attempt=None))
    assert plan.reach("step", ["req-70~2"]) is None  # another request with a longer id
    with pytest.raises(InjectedFault):
        plan.reach("step", ["req-7~2"])  # any attempt of req-7


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"point": "lunch", "action": "exit"}, "point must be one of"),
        ({"point": "step", "action": "drop"}, "action at step must be one of raise, exit, hang"),
        ({"point": "transfer", "action": "exit"}, "must be one of drop, fail, delay"),
        ({"point": "step", "action": "raise", "nth": 0}, "nth must be an integer >= 1"),
        ({"point": "step", "action": "raise", "when": 1}, "unknown fault fields: when"),
    ],
)
def test_bad_faults_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        Fault.from_dict(fields)
