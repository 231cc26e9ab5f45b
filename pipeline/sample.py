"""Sample runs (`run FILE --sample K`): which K lines of a file render first, and what the
whole file would cost at the price those lines paid."""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import ItemStatus, Job, JobItem, JobStatus


def line_key(row: Sequence[Any]) -> int:
    """A job line's place in the draw: a digest of its number, custom_id and request body,
    so the same file always samples the same lines and any other file others."""
    line, custom_id, body = row[0], row[1], row[2]
    text = f"{line}\x00{custom_id or ''}\x00{body}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


class Sampler:
    """The `size` lines with the smallest keys, kept as a file streams by: memory holds
    `size` lines whatever the file's length."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: list[tuple[int, int, Any]] = []  # (-key, line, what to keep): a max-heap

    def offer(self, row: Sequence[Any], kept: Any) -> None:
        entry = (-line_key(row), row[0], kept)
        if len(self._kept) < self.size:
            heapq.heappush(self._kept, entry)
        elif entry > self._kept[0]:  # a smaller key than the largest kept
            heapq.heapreplace(self._kept, entry)

    def chosen(self) -> list[Any]:
        """What was kept of the chosen lines, in line order."""
        return [kept for _, _, kept in sorted(self._kept, key=lambda entry: entry[1])]


@dataclass(frozen=True)
class SampleCost:
    """What a sample cost and what the whole file would cost at that price."""

    lines: int  # sampled lines that were rendered
    total_lines: int  # the file's valid lines (those a whole run renders)
    cents: int  # what the sample spent
    projected_cents: int

    def as_dict(self) -> dict[str, int]:
        return {"sample_lines": self.lines, "total_lines": self.total_lines,
                "sample_cents": self.cents, "projected_cents": self.projected_cents}


def sample_cost(summary: dict[str, Any]) -> SampleCost:
    """The cost of a job's rendered sample (`jobs.job_summary` of the paused job), projected
    to every line a whole run renders: the sample's spend per line times those lines, to the
    nearest cent. The lines not sampled are the items that have not ended."""
    lines = summary["sample_lines"]
    rest = (summary["items_total"] - summary["items_succeeded"] - summary["items_failed"]
            - summary["items_cancelled"])
    cents = summary["spent_cents"]
    projected = cents + (cents * rest + lines // 2) // lines if lines else cents
    return SampleCost(lines, lines + rest, cents, projected)


def sample_rendered(session: Session, job_id: int) -> bool:
    """Whether a `run --sample` job has rendered its whole sample: it is paused with no item
    under way (a Ctrl-C during the sample pauses it with some still to render)."""
    status, sample_lines = session.execute(
        select(Job.status, Job.sample_lines).where(Job.id == job_id)).one()
    if status != JobStatus.PAUSED or sample_lines is None:
        return False
    return not session.scalar(select(JobItem.id).where(
        JobItem.job_id == job_id, JobItem.status == ItemStatus.RUNNING).limit(1))
