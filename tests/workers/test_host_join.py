"""The join's agreement on two real gloo ranks (no Ray): a job that one rank could not load
fails with that rank's own error, whichever rank failed and whatever the reporting rank
(rank 0) was still doing with it."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest

from api.server_process import free_port


def agree(rank: int, port: int, results: Any) -> None:
    """One rank: announce three joins by hand, fail some of them on one rank, agree."""
    import torch.distributed as dist

    from core.objectstore import ObjectNotFound
    from core.spec import JobSpec
    from workers.host.join import HostJoins, PendingJoin

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        joins = HostJoins()
        joins.rank, joins.world_size, joins.slots, joins._holding_since = rank, 2, [], None
        reported: list[tuple[Any, ...]] = []
        joins._report = lambda *event: reported.append(event)  # type: ignore[method-assign]
        joins.pending = {}
        for job_id in ("job-1-fails-on-rank-1", "job-2-rank-0-still-loading", "job-3-both"):
            joins.pending[job_id] = PendingJoin(JobSpec(job_id, "t", 1, "tiny", "", "x"))
        missing = ObjectNotFound("files/t/missing.jsonl")
        if rank == 0:
            joins.pending["job-1-fails-on-rank-1"].done.set()  # loaded fine here
            # job-2: still loading on rank 0 (its done event is not set)
            joins.pending["job-3-both"].error = ValueError("line 3: no messages")
        else:
            joins.pending["job-1-fails-on-rank-1"].error = missing
            joins.pending["job-2-rank-0-still-loading"].error = missing
            joins.pending["job-3-both"].error = ValueError("line 3 on rank 1")
        for pending in joins.pending.values():
            if pending.error is not None:
                pending.done.set()
        joins._agree_on_joins()
        results.put((rank, reported, sorted(joins.pending)))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_a_join_that_fails_on_another_rank_names_that_ranks_error() -> None:
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    port = free_port()
    ranks = [spawn.Process(target=agree, args=(rank, port, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        found = dict(
            (rank, (reported, left))
            for rank, reported, left in (results.get(timeout=150) for _ in ranks)
        )
    finally:
        for process in ranks:
            process.join(timeout=30)
    assert [p.exitcode for p in ranks] == [0, 0]
    reported, left = found[0]
    assert left == [] and found[1][1] == []  # every job ended its join on both ranks
    failures = {job_id: (message, data) for job_id, kind, message, data in reported}
    assert {kind for _, kind, _, _ in reported} == {"job_failed"}
    for job_id in ("job-1-fails-on-rank-1", "job-2-rank-0-still-loading"):
        message, data = failures[job_id]
        assert "missing.jsonl" in message and "ObjectNotFound" in message, message
        assert "missing.jsonl" in data["error"] and data["rank"] == 1
    # Both failed: the first rank's own error is kept.
    message, data = failures["job-3-both"]
    assert message == "Training failed: ValueError: line 3: no messages" and data["rank"] == 0
