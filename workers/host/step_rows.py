"""What each job puts through the base in a pack step (workers.host.step): its padded width,
the pack grouped by width, and its rows collated, each job's own part caught on its own.

A job whose width, rows or collation raises fails alone ("data", workers.host.failures): it
drops out of its group's forward on this rank, the way a job that is not in the pack would
be absent, so its mates' batch is the one they would have without it. Its width comes from
its global batch (the same on every rank), so a failure there happens on every rank and no
rank runs a forward the others skip; its rows and their collation are this rank's share, so
a failure there may be this rank's alone: the group's forwards still happen on every rank
(a collective under ZeRO-3), with a placeholder row in the failed job's block when nothing
else is left of the group here, and the ranks agree on the failure with the step's other
failures.
"""

from __future__ import annotations

import torch

from workers.data.tokenization import IGNORE_INDEX, TokenizedExample, collate
from workers.host.failures import StepFailures
from workers.host.slot import JobSlot

# Widths are rounded up to a multiple of this, so jobs of similar lengths share a forward.
WIDTH_BUCKET = 16

Batch = dict[str, torch.Tensor]


def width_of(slot: JobSlot, bucket: int = WIDTH_BUCKET) -> int:
    """The padded width of a job's rows at its current step: from the job's own global batch
    only (the same on every rank, and the same alone or packed), rounded up to a bucket so
    that jobs of similar lengths share a forward. A DPO pair's two rows both count."""
    longest = max(
        len(row.input_ids) for i in slot.batches[slot.step] for row in slot.examples[i].rows
    )
    return -(-longest // bucket) * bucket


def groups_by_width(active: list[JobSlot], failures: StepFailures) -> dict[int, list[JobSlot]]:
    """{width: its slots in the pack's order}, narrowest first; a slot whose width raises is
    in no group and fails in its "data" (the same on every rank: see the module's note)."""
    groups: dict[int, list[JobSlot]] = {}
    for slot in active:
        try:
            width = width_of(slot)
        except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
            failures.add(slot.job_id, "data", exc)
            continue
        groups.setdefault(width, []).append(slot)
    return {width: groups[width] for width in sorted(groups)}


def job_batches(
    group: list[JobSlot],
    width: int,
    pad_token_id: int,
    rank: int,
    world_size: int,
    failures: StepFailures,
) -> dict[str, Batch]:
    """Each slot's share of rows on this rank, collated to the group's width (per job: rows
    are padded one by one, so the jobs' batches put together are the group's batch as one
    collation of all its rows would be). A slot whose rows or collation raise is left out
    and fails in its "data"."""
    batches = {}
    for slot in group:
        try:
            batches[slot.job_id] = collate_rows(
                slot.next_rows(rank, world_size), pad_token_id, width
            )
        except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
            failures.add(slot.job_id, "data", exc)
    return batches


def collate_rows(rows: list[TokenizedExample], pad_token_id: int, width: int) -> Batch:
    """`collate` of a job's rows; none (a rank with no share of its batch): empty tensors."""
    if not rows:
        empty = torch.zeros((0, width), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty, "labels": empty}
    return collate(rows, pad_token_id, width)


def placeholder(width: int, pad_token_id: int) -> Batch:
    """One row that trains nothing: a forward this rank must make (the other ranks make it
    with their rows) when every job of the group failed here and no other rows are left
    (a forward of no rows cannot run). Its first token is attended (a row attending to
    nothing has no softmax) and none is counted."""
    input_ids = torch.full((1, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((1, width), dtype=torch.long)
    attention_mask[0, 0] = 1
    labels = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def joined(batches: list[Batch]) -> Batch:
    """The jobs' batches one after the other (rows never mix: the group's batch)."""
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
