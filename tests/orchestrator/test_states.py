from pathlib import Path

from orchestrator.states import TRANSITIONS, JobStatus, is_allowed, mermaid_diagram, sources_of


def test_terminal_statuses_have_no_way_out() -> None:
    terminal = {s for s in JobStatus if s.is_terminal()}
    assert terminal == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    for status in terminal:
        assert not any(is_allowed(status, target) for target in JobStatus)


def test_every_status_is_reachable_from_validating_files() -> None:
    seen, frontier = {JobStatus.VALIDATING_FILES}, [JobStatus.VALIDATING_FILES]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(JobStatus)


def test_sources_of_is_the_inverse_of_the_table() -> None:
    assert set(sources_of(JobStatus.RUNNING)) == {JobStatus.QUEUED}
    assert set(sources_of(JobStatus.CANCELLED)) == {
        JobStatus.VALIDATING_FILES,
        JobStatus.QUEUED,
        JobStatus.CANCELLING,
        JobStatus.PAUSED,
    }
    assert sources_of(JobStatus.VALIDATING_FILES) == ()


def test_infrastructure_failure_requeues_a_running_job() -> None:
    assert is_allowed(JobStatus.RUNNING, JobStatus.QUEUED)
    assert not is_allowed(JobStatus.SUCCEEDED, JobStatus.QUEUED)


def test_readme_state_diagram_is_generated_from_the_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    regenerate = "python -c 'from orchestrator.states import *; print(mermaid_diagram())'"
    assert mermaid_diagram() in readme, f"update the README's diagram: {regenerate}"


def test_pause_is_a_round_trip_through_paused_that_cancel_can_end() -> None:
    assert is_allowed(JobStatus.RUNNING, JobStatus.PAUSING)
    assert set(sources_of(JobStatus.PAUSED)) == {JobStatus.PAUSING}
    assert is_allowed(JobStatus.PAUSED, JobStatus.QUEUED)  # resume
    # Cancel works in both: a pausing job is asked to stop, a paused one ends at once.
    assert is_allowed(JobStatus.PAUSING, JobStatus.CANCELLING)
    assert is_allowed(JobStatus.PAUSED, JobStatus.CANCELLED)
    # Only a running job is paused; a queued one is not (it holds no slot).
    assert set(sources_of(JobStatus.PAUSING)) == {JobStatus.RUNNING}
    assert not JobStatus.PAUSED.is_terminal()
