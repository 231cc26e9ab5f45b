"""A job's stored files as rows (JSONL or CSV): one row per file, read from SQL only."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import Image, JobItem, Render

EXPORT_FIELDS = (
    "job_id", "custom_id", "line", "render", "index", "uri", "content_type", "bytes", "sha256",
    "width", "height", "seed", "revised_prompt", "cost_cents", "model", "metadata",
)


def export_rows(session: Session, job_id: int, uri_of: Callable[[str], str]
                ) -> Iterator[dict[str, Any]]:
    """The job's files in line order; `uri_of(key)` is the store's URI of a key."""
    query = (
        select(Image, JobItem, Render)
        .join(Render, Render.id == Image.render_id)
        .join(JobItem, JobItem.id == Render.item_id)
        .where(Image.job_id == job_id)
        .order_by(JobItem.line, Render.render_index, Image.image_index)
    )
    for image, item, render in session.execute(query).yield_per(1000):
        yield {
            "job_id": job_id,
            "custom_id": item.custom_id,
            "line": item.line,
            "render": render.render_index,
            "index": image.image_index,
            "uri": uri_of(image.key),
            "content_type": image.content_type,
            "bytes": image.bytes,
            "sha256": image.sha256,
            "width": image.width,
            "height": image.height,
            "seed": image.seed,
            "revised_prompt": image.revised_prompt,
            "cost_cents": image.cost_cents,
            "model": render.model,
            "metadata": json.loads(item.meta) if item.meta else None,
        }


def write_export(rows: Iterator[dict[str, Any]], out: IO[str], fmt: str) -> int:
    count = 0
    if fmt == "csv":
        # CRLF, as RFC 4180 has it: the csv module quotes a field holding any character of
        # the line terminator only, so with LF alone a CR inside a revised prompt went out
        # bare and split the row in two for every reader.
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\r\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(_flat(row))
            count += 1
        return count
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count


# A cell starting with one of these is read as a formula by spreadsheets (OWASP, "CSV
# Injection"): =HYPERLINK(...) in a custom_id or revised prompt would run when opened.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat = dict(row)
    if flat["metadata"] is not None:
        flat["metadata"] = json.dumps(flat["metadata"], ensure_ascii=False)
    return {k: ("" if v is None else neutralised(v)) for k, v in flat.items()}


def neutralised(value: Any) -> Any:
    """A CSV cell as a spreadsheet shows it and never runs it: a string that starts like a
    formula gets a single quote in front. CSV only: JSONL keeps every value exact."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
