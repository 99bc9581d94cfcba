from dataclasses import dataclass, field
from typing import Any

from orchestrator.scheduling.packing import plan_packs


@dataclass
class Job:
    id: str
    created_at: float = 0
    model: str = "tiny"
    settings: dict[str, Any] = field(
        default_factory=lambda: {"resources": {"num_workers": 2, "use_gpu": None}, "packing": True}
    )


def job(job_id: str, created_at: float = 0, **changes: Any) -> Job:
    j = Job(job_id, created_at)
    packing = changes.pop("packing", True)
    j.settings = {"resources": {"num_workers": 2, "use_gpu": None, **changes}, "packing": packing}
    return j


def ids(packs: list[list[Job]]) -> list[list[str]]:
    return [[j.id for j in p] for p in packs]


def plan(queue: list[Job], **kw: Any) -> list[list[str]]:
    options = {"max_pack_size": 3, "free_runs": 10, "now": 100.0, "window_s": 2.0, **kw}
    return ids(plan_packs(queue, **options))


def test_jobs_sharing_base_and_shape_pack_up_to_the_bound() -> None:
    queue = [job(f"j{i}") for i in range(5)]
    assert plan(queue) == [["j0", "j1", "j2"], ["j3", "j4"]]


def test_different_bases_or_shapes_never_share_a_run() -> None:
    other = job("b")
    other.model = "other-base"
    queue = [job("a"), other, job("c", num_workers=4), job("d", use_gpu=True), job("e")]
    assert plan(queue) == [["a", "e"], ["b"], ["c"], ["d"]]


def test_packing_false_runs_alone_at_once() -> None:
    queue = [
        job("a", created_at=99.5),
        job("solo", created_at=99.5, packing=False),
        job("c", created_at=99.5),
    ]
    assert plan(queue) == [["solo"]]  # the others still wait for company
    assert plan(queue, now=102) == [["a", "c"], ["solo"]]


def test_a_pack_waits_for_company_unless_full() -> None:
    young = [job("a", created_at=99.0), job("b", created_at=99.5)]
    assert plan(young) == []
    assert plan(young, now=101.0) == [["a", "b"]]
    full = [job(f"j{i}", created_at=99.9) for i in range(3)]
    assert plan(full) == [["j0", "j1", "j2"]]


def test_only_as_many_runs_as_are_free() -> None:
    queue = [job(f"j{i}") for i in range(7)]
    assert plan(queue, free_runs=2) == [["j0", "j1", "j2"], ["j3", "j4", "j5"]]
    assert plan(queue, free_runs=0) == []
