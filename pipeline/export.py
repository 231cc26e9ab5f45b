"""A job's stored files as rows (JSONL or CSV): one row per file, read from SQL only.

Each key of the items' metadata is also a column of its own (pipeline/datasets.py names and
types them), after the fixed ones."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Iterator
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from pipeline.datasets import (
    DATASET_FORMATS,
    ExportError,
    ExportSummary,
    export_dataset,
    metadata_columns,
    open_rows_output,
    prompt_of,
    reused_file,
)
from pipeline.models import Image, JobItem, Render
from pipeline.storage import MediaStore

EXPORT_FIELDS = (
    "job_id", "custom_id", "line", "render", "index", "uri", "content_type", "bytes", "sha256",
    "width", "height", "seed", "revised_prompt", "cost_cents", "request_id", "reused_from",
    "model", "metadata", "prompt",
)


def export_rows(session: Session, job_id: int, uri_of: Callable[[str], str]
                ) -> Iterator[dict[str, Any]]:
    """The job's files in line order; `uri_of(key)` is the store's URI of a key. Metadata
    values are exact here (JSONL); CSV writes them as text."""
    meta_columns = metadata_columns(session, job_id)
    original = aliased(Image)
    query = (
        select(Image, JobItem, Render, original.key)
        .join(Render, Render.id == Image.render_id)
        .join(JobItem, JobItem.id == Render.item_id)
        .outerjoin(original, reused_file(original))
        .where(Image.job_id == job_id)
        .order_by(JobItem.line, Render.render_index, Image.image_index)
    )
    for image, item, render, original_key in session.execute(query).yield_per(1000):
        meta = json.loads(item.meta) if item.meta else None
        fields = meta if isinstance(meta, dict) else {}
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
            "request_id": render.request_id,
            # The file this one was copied from (seeded reuse), as a URI; None: rendered here.
            "reused_from": None if original_key is None else uri_of(original_key),
            "model": render.model,
            "metadata": meta,
            "prompt": prompt_of(item.body),
            **{column.name: fields.get(column.key) for column in meta_columns},
        }


def write_export(rows: Iterator[dict[str, Any]], out: IO[str], fmt: str) -> int:
    count = 0
    if fmt == "csv":
        rows = iter(rows)
        first = next(rows, None)
        # CRLF, as RFC 4180 has it: the csv module quotes a field holding any character of
        # the line terminator only, so with LF alone a CR inside a revised prompt went out
        # bare and split the row in two for every reader.
        # Every row has the same columns: the fixed ones, then the job's metadata keys.
        fields = EXPORT_FIELDS if first is None else list(first)
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\r\n")
        writer.writeheader()
        for row in () if first is None else itertools.chain([first], rows):
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
    """Values as CSV text: the metadata object, and lists, objects and booleans in metadata
    columns, as JSON."""
    flat = {k: _as_text(v) for k, v in row.items()}
    if row["metadata"] is not None:
        flat["metadata"] = json.dumps(row["metadata"], ensure_ascii=False)
    return {k: ("" if v is None else neutralised(v)) for k, v in flat.items()}


def _as_text(value: Any) -> Any:
    if value is None or isinstance(value, str) or (
            isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    return json.dumps(value, ensure_ascii=False)


def neutralised(value: Any) -> Any:
    """A CSV cell as a spreadsheet shows it and never runs it: a string that starts like a
    formula gets a single quote in front. CSV only: JSONL keeps every value exact."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def export_job(session: Session, job_id: int, store: MediaStore, fmt: str, output: str, *,
               shard_size: int = 1000, embed: bool = False,
               on_file: Callable[[], None] = lambda: None) -> ExportSummary:
    """Write the job's files to `output` as rows (jsonl, csv) or a dataset (hf, webdataset,
    parquet); ExportError names what cannot be done as asked."""
    if embed and fmt != "parquet":
        raise ExportError("--embed: only with --format parquet")
    if fmt in DATASET_FORMATS:
        return export_dataset(session, job_id, store, fmt, output, shard_size=shard_size,
                              embed=embed, on_file=on_file)
    with open_rows_output(output, f"job-{job_id:06d}.{fmt}") as file:
        count = write_export(export_rows(session, job_id, store.uri), file, fmt)
    return ExportSummary(job_id, fmt, output, count, skipped=0, outputs=1)
