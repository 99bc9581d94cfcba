"""The test hook of issue 17 (core.fault_injection) is off unless a test turns it on, and fires
only for the job, step, phase and ranks it names."""

from __future__ import annotations

import dataclasses

import pytest

from core.fault_injection import InjectedFault, StepFault, injected_fault
from core.host_protocol import HostSpec


def test_no_host_carries_a_fault_unless_a_test_sets_one() -> None:
    [field] = [f for f in dataclasses.fields(HostSpec) if f.name == "test_faults"]
    assert field.default == ()
    assert injected_fault((), "job-a", 0, "forward", 0) is None


def test_a_fault_fires_for_its_job_step_phase_and_ranks_only() -> None:
    faults = (StepFault("job-a", step=2, phase="loss", ranks=(1,)),)
    fired = injected_fault(faults, "job-a", 2, "loss", 1)
    assert isinstance(fired, InjectedFault) and "loss" in str(fired)
    assert injected_fault(faults, "job-a", 2, "loss", 0) is None  # another rank
    assert injected_fault(faults, "job-a", 1, "loss", 1) is None  # another step
    assert injected_fault(faults, "job-a", 2, "forward", 1) is None  # another phase
    assert injected_fault(faults, "job-b", 2, "loss", 1) is None  # another job
    everywhere = (StepFault("job-a", step=0, phase="optimizer"),)
    assert all(injected_fault(everywhere, "job-a", 0, "optimizer", r) for r in range(4))


def test_an_unknown_phase_is_refused() -> None:
    with pytest.raises(ValueError, match="phase must be one of"):
        StepFault("job-a", step=0, phase="everywhere")  # type: ignore[arg-type]
