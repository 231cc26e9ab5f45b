"""A job's files as a dataset that training code loads as it is: a Hugging Face imagefolder,
webdataset tar shards or a Parquet table, in a local folder or under an s3:// prefix.

Everything streams: rows come from SQL in chunks, bytes are read one file at a time from the
job's store, and what is held at once is one file, one shard being written and one Parquet
row group, never a list of the job's rows."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session, aliased

from pipeline.models import Image, JobItem, Render
from pipeline.storage import MediaStore, S3Store, StorageError, open_store, safe_slug

__all__ = [
    "DATASET_FORMATS",
    "ExportError",
    "ExportSummary",
    "FileRow",
    "MetadataColumn",
    "export_dataset",
    "file_count",
    "file_rows",
    "file_target",
    "metadata_columns",
    "open_rows_output",
]

DATASET_FORMATS = ("hf", "webdataset", "parquet")

# The columns of every file, in this order, then one column per metadata key.
FILE_COLUMNS = (
    "custom_id", "prompt", "revised_prompt", "seed", "model", "width", "height",
    "content_type", "sha256", "cost_cents", "bytes", "uri", "line", "render", "index",
    "metadata", "request_id", "reused_from",
)
# Names a metadata key cannot take as they are: a key named like one of these gets the
# prefix "metadata_" (its value is never dropped: `metadata` keeps the whole object).
RESERVED = frozenset({*FILE_COLUMNS, "file_name", "content", "image", "audio", "video",
                      "json", "__key__", "__url__", "__local_path__"})
# A job whose lines carry more distinct metadata keys than this keeps the rest in `metadata`
# only: a column per key of a million unique keys would make a table no one can load.
MAX_METADATA_COLUMNS = 200
# Splits become folders; a job naming more splits than this is not a train/test split.
MAX_SPLITS = 100
ROW_CHUNK = 1000  # rows fetched from SQL at once
# A Parquet row group is written when it holds this many rows or (with --embed) bytes.
ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 64 * 1024 * 1024


class ExportError(Exception):
    """The export cannot be made as asked; the message names what and where (no secrets)."""


@dataclass(frozen=True)
class MetadataColumn:
    """One metadata key as a column: `kind` is the type all its values share (string, int,
    float, bool) or json when they differ or are objects (then the cell is JSON text)."""

    key: str
    name: str
    kind: str


@dataclass(frozen=True)
class FileRow:
    """One stored file of the job and its columns (FILE_COLUMNS, then metadata columns)."""

    store_key: str
    sample_key: str  # unique in the job, no dot: line, render and index
    extension: str
    split: str | None
    columns: dict[str, Any]


@dataclass(frozen=True)
class ExportSummary:
    job: int
    format: str
    destination: str
    files: int
    skipped: int
    outputs: int  # shards, split folders or tables written

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "format": self.format, "destination": self.destination,
                "files": self.files, "skipped": self.skipped, "outputs": self.outputs}


# --- columns ---------------------------------------------------------------------------------


def value_kind(value: Any) -> str | None:
    """The column type of one metadata value (None: a null, which fits every type)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(2**63) <= value < 2**63 else "json"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "json"


def merged_kind(old: str | None, new: str | None) -> str | None:
    """The type a column keeps when it has seen values of both kinds."""
    if old is None or old == new:
        return new if old is None else old
    if new is None:
        return old
    if {old, new} == {"int", "float"}:
        return "float"
    return "json"


def column_name(key: str, taken: set[str]) -> str | None:
    """The column of metadata key `key`, or None when even its prefixed name is taken."""
    name = key if key not in RESERVED else f"metadata_{key}"
    return None if name in taken or name in RESERVED else name


def metadata_columns(session: Session, job_id: int) -> list[MetadataColumn]:
    """The job's metadata keys in first-seen order, each with the type of all its values:
    one streamed pass over the items' metadata (held: one entry per distinct key)."""
    kinds: dict[str, str | None] = {}
    query = (select(JobItem.meta).where(JobItem.job_id == job_id, JobItem.meta.is_not(None))
             .order_by(JobItem.line).execution_options(yield_per=ROW_CHUNK))
    for (text,) in session.execute(query):
        meta = json.loads(text)
        if not isinstance(meta, dict):
            continue
        for key, value in meta.items():
            if key in kinds:
                kinds[key] = merged_kind(kinds[key], value_kind(value))
            elif len(kinds) < MAX_METADATA_COLUMNS:
                kinds[key] = value_kind(value)
    columns, taken = [], set()
    for key, kind in kinds.items():
        name = column_name(key, taken)
        if name is not None:
            taken.add(name)
            columns.append(MetadataColumn(key, name, kind or "string"))
    return columns


def cell(value: Any, kind: str) -> Any:
    """A metadata value as its column holds it (json: JSON text; float: a float)."""
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, ensure_ascii=False)
    if kind == "float":
        return float(value)
    return value


def file_count(session: Session, job_id: int) -> int:
    return session.scalar(select(func.count()).select_from(Image).where(Image.job_id == job_id))


def file_rows(session: Session, job_id: int, uri_of: Callable[[str], str],
              meta_columns: list[MetadataColumn]) -> Iterator[FileRow]:
    """The job's files in line order, fetched from SQL in chunks of ROW_CHUNK rows."""
    original = aliased(Image)
    query = (
        select(Image.key, Image.image_index, Image.content_type, Image.bytes, Image.sha256,
               Image.width, Image.height, Image.seed, Image.revised_prompt, Image.cost_cents,
               Render.render_index, Render.model, Render.request_id, JobItem.line,
               JobItem.custom_id, JobItem.body, JobItem.meta,
               original.key.label("original_key"))
        .join(Render, Render.id == Image.render_id)
        .join(JobItem, JobItem.id == Render.item_id)
        .outerjoin(original, reused_file(original))
        .where(Image.job_id == job_id)
        .order_by(JobItem.line, Render.render_index, Image.image_index)
        .execution_options(yield_per=ROW_CHUNK)
    )
    for row in session.execute(query):
        meta = json.loads(row.meta) if row.meta else None
        columns: dict[str, Any] = {
            "custom_id": row.custom_id,
            "prompt": prompt_of(row.body),
            "revised_prompt": row.revised_prompt,
            "seed": row.seed,
            "model": row.model,
            "width": row.width,
            "height": row.height,
            "content_type": row.content_type,
            "sha256": row.sha256,
            "cost_cents": row.cost_cents,
            "bytes": row.bytes,
            "uri": uri_of(row.key),
            "line": row.line,
            "render": row.render_index,
            "index": row.image_index,
            "metadata": None if meta is None else json.dumps(meta, ensure_ascii=False),
            "request_id": row.request_id,
            "reused_from": None if row.original_key is None else uri_of(row.original_key),
        }
        fields = meta if isinstance(meta, dict) else {}
        for column in meta_columns:
            columns[column.name] = cell(fields.get(column.key), column.kind)
        split = fields.get("split")
        yield FileRow(
            store_key=row.key,
            sample_key=f"{row.line:08d}-r{row.render_index:03d}-i{row.image_index:02d}",
            extension=row.key.rpartition(".")[2].lower() if "." in row.key else "bin",
            split=None if split is None else str(split),
            columns=columns,
        )


def reused_file(original: Any) -> ColumnElement[bool]:
    """Joins an image to the file it was copied from (seeded reuse), when it was: the same
    index of the render named by its render's `reused_from`. None when rendered here, or
    when the original's job was deleted since."""
    return and_(original.render_id == Render.reused_from,
                original.image_index == Image.image_index)


def prompt_of(body: str) -> str | None:
    """The prompt of a request body (JSON text), None when it has none."""
    try:
        prompt = json.loads(body).get("prompt")
    except (ValueError, AttributeError):
        return None
    return prompt if isinstance(prompt, str) else None


def split_folder(split: str | None) -> str:
    """The folder of a split: its slug ([a-z0-9._-]), `train` when it has none."""
    return safe_slug(split) or "train"


# --- destinations ----------------------------------------------------------------------------


class Destination:
    """Where an export goes: a local folder, or an s3:// prefix (boto3's AWS_* settings).
    Files are written whole under a temporary name and then renamed (folder) or uploaded
    (S3), so a reader never sees half a shard."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._s3: S3Store | None = None
        self._root: Path | None = None
        if urlsplit(target).scheme.lower() == "s3":
            try:
                store = open_store(target.rstrip("/"))
            except StorageError as exc:
                raise ExportError(f"{exc}".replace("storage URL", "export destination")
                                  ) from None
            assert isinstance(store, S3Store)
            self._s3 = store
        else:
            self._root = Path(target).expanduser()

    def __str__(self) -> str:
        if self._s3 is not None:
            prefix = f"{self._s3.prefix}/" if self._s3.prefix else ""
            return f"s3://{self._s3.bucket}/{prefix}"
        return str(self._root)

    def check(self, *, empty: bool = False) -> None:
        """ExportError unless files can be written here (folder made, bucket there) and, when
        `empty`, nothing is there yet: a folder dataset is every file under it, so files
        left by an earlier export (a shard more, a split of another job) would be loaded
        with it."""
        if self._s3 is not None:
            try:
                self._s3.check()
                there = empty and self._first_s3_key()
            except StorageError as exc:
                raise ExportError(f"cannot export to {self}: {exc}") from None
            if there:
                raise ExportError(f"{self}: not empty (s3://{self._s3.bucket}/{there} is "
                                  "there): export a dataset to a new prefix")
            return
        assert self._root is not None
        if self._root.exists() and not self._root.is_dir():
            raise ExportError(f"{self._root}: a file, not a folder")
        if empty and self._root.is_dir() and next(self._root.iterdir(), None) is not None:
            raise ExportError(f"{self._root}: not empty: export a dataset to a new folder")
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self._root, prefix=".imagebatch-probe-"):
                pass
        except OSError as exc:
            raise ExportError(f"{self._root}: cannot write here: "
                              f"{exc.strerror or exc}") from None

    def _first_s3_key(self) -> str | None:
        assert self._s3 is not None
        prefix = f"{self._s3.prefix}/" if self._s3.prefix else ""
        with self._s3._errors("list", prefix):
            listed = self._s3._client.list_objects_v2(Bucket=self._s3.bucket, Prefix=prefix,
                                                      MaxKeys=1)
        return next((found["Key"] for found in listed.get("Contents", ())), None)

    def put(self, name: str, data: bytes, content_type: str) -> None:
        if self._s3 is not None:
            self._s3.put(name, data, content_type)
            return
        with self.open(name) as out:
            out.write(data)

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file that becomes `name` once the block ends without an error."""
        if self._s3 is not None:
            with tempfile.TemporaryFile() as spool:
                yield spool
                spool.seek(0)
                self._upload(name, spool)
            return
        assert self._root is not None
        path = self._root.joinpath(*name.split("/"))
        part = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as out:
                yield out
            os.replace(part, path)
        except BaseException as exc:
            with suppress(OSError):
                os.unlink(part)
            if isinstance(exc, OSError):
                raise ExportError(f"{path}: cannot write: {exc.strerror or exc}") from None
            raise

    def _upload(self, name: str, spool: IO[bytes]) -> None:
        assert self._s3 is not None
        full = self._s3._full(name)
        # A seekable file: boto3's retries resend it from the start.
        with self._s3._errors("upload", full):
            self._s3._client.upload_fileobj(spool, self._s3.bucket, full)


# --- formats ---------------------------------------------------------------------------------


def export_dataset(session: Session, job_id: int, store: MediaStore, fmt: str, target: str, *,
                   shard_size: int = 1000, embed: bool = False,
                   on_file: Callable[[], None] = lambda: None) -> ExportSummary:
    """Write the job's files as `fmt` (hf, webdataset or parquet) to `target`."""
    if fmt not in DATASET_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {DATASET_FORMATS}")
    if shard_size < 1:
        raise ExportError(f"--shard-size {shard_size}: must be at least 1")
    if fmt in ("hf", "parquet"):
        _require_pyarrow(fmt)
    target, table = file_target(target, f"job-{job_id:06d}.parquet") if fmt == "parquet" \
        else (target, "")
    destination = Destination(target)
    destination.check(empty=fmt != "parquet")
    meta = metadata_columns(session, job_id)
    rows = file_rows(session, job_id, store.uri, meta)
    if fmt == "hf":
        files, skipped, outputs = _write_imagefolder(rows, store, destination, meta, on_file)
    elif fmt == "webdataset":
        files, skipped, outputs = _write_shards(rows, store, destination, shard_size, on_file)
    else:
        files, skipped, outputs = _write_parquet(
            rows, store, destination, table, meta, embed, on_file)
    return ExportSummary(job_id, fmt, str(destination), files, skipped, outputs)


def _require_pyarrow(fmt: str) -> None:
    """pyarrow writes Parquet (the table, and hf's metadata); it is an optional extra."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ExportError(f"--format {fmt} needs pyarrow: pip install 'imagebatch[datasets]' "
                          "(or pip install pyarrow)") from None


def file_target(target: str, default_name: str) -> tuple[str, str]:
    """A DEST of one file (parquet, jsonl, csv) as (folder or prefix, file name): a DEST that
    ends in '/' or is a folder gets `default_name`; anything else is the file itself."""
    is_s3 = urlsplit(target).scheme.lower() == "s3"
    if target.endswith("/") or (not is_s3 and Path(target).expanduser().is_dir()):
        return target, default_name
    head, _, name = target.rpartition("/")
    if is_s3 and head == "s3:/":  # s3://bucket: the bucket's top
        return target + "/", default_name
    if not head:
        return ("/" if target.startswith("/") else "."), name
    return head, name


@contextmanager
def open_rows_output(target: str, default_name: str) -> Iterator[IO[str]]:
    """The text file JSONL or CSV rows go to: a local file, or an S3 object uploaded once
    the rows are written; either appears whole or not at all."""
    folder, name = file_target(target, default_name)
    destination = Destination(folder)
    destination.check()
    with destination.open(name) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        yield text
        text.flush()
        text.detach()


def _write_imagefolder(rows: Iterator[FileRow], store: MediaStore, destination: Destination,
                       meta: list[MetadataColumn], on_file: Callable[[], None]
                       ) -> tuple[int, int, int]:
    """Images under SPLIT/NNNNN/KEY.EXT with one SPLIT/metadata.parquet each. Audio and video
    are skipped: `imagefolder` loads images only (counted as skipped)."""
    files = skipped = 0
    with _SplitMetadata(destination, meta) as metadata:
        for row in rows:
            on_file()
            if not row.columns["content_type"].startswith("image/"):
                skipped += 1
                continue
            folder = split_folder(row.split)
            # A thousand lines a folder: no folder of a million files.
            file_name = f"{row.columns['line'] // 1000:05d}/{row.sample_key}.{row.extension}"
            destination.put(f"{folder}/{file_name}", store.get(row.store_key),
                            row.columns["content_type"])
            metadata.write(folder, {"file_name": file_name, **row.columns})
            files += 1
        return files, skipped, metadata.splits


class _SplitMetadata:
    """One metadata.parquet per split folder, written a row group at a time as rows arrive.

    Parquet, not metadata.jsonl: JSON carries no types, so datasets infers each split's from
    its first rows, and a column empty there (no revised prompt in the test split) loads as
    null in one split and string in the other, which load_dataset refuses."""

    def __init__(self, destination: Destination, meta: list[MetadataColumn]) -> None:
        import pyarrow as pa

        self.destination = destination
        self.schema = pa.schema([pa.field("file_name", pa.string()),
                                 *parquet_schema(meta, embed=False)])
        self._stack = ExitStack()
        self._writers: dict[str, Any] = {}
        self._groups: dict[str, list[dict[str, Any]]] = {}

    @property
    def splits(self) -> int:
        return len(self._writers)

    def __enter__(self) -> _SplitMetadata:
        self._stack.__enter__()
        return self

    def write(self, folder: str, record: dict[str, Any]) -> None:
        if folder not in self._writers:
            if len(self._writers) >= MAX_SPLITS:
                raise ExportError(f"more than {MAX_SPLITS} distinct values of the metadata key "
                                  "'split': it names train/test splits, one folder each")
            import pyarrow.parquet as pq

            out = self._stack.enter_context(self.destination.open(f"{folder}/metadata.parquet"))
            self._writers[folder] = self._stack.enter_context(
                pq.ParquetWriter(out, self.schema, compression="zstd"))
            self._groups[folder] = []
        group = self._groups[folder]
        group.append(record)
        if len(group) >= ROW_GROUP_ROWS:
            self._flush(folder)

    def _flush(self, folder: str) -> None:
        import pyarrow as pa

        self._writers[folder].write_table(
            pa.Table.from_pylist(self._groups[folder], schema=self.schema))
        self._groups[folder] = []

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            for folder, group in self._groups.items():
                if group:
                    self._flush(folder)
        self._stack.__exit__(*exc)


def _write_shards(rows: Iterator[FileRow], store: MediaStore, destination: Destination,
                  shard_size: int, on_file: Callable[[], None]) -> tuple[int, int, int]:
    """shard-000000.tar, ... of `shard_size` samples: KEY.EXT (the file) and KEY.json."""
    files = shards = 0
    batch = _chunks(rows, shard_size)
    for chunk in batch:
        with destination.open(f"shard-{shards:06d}.tar") as out, \
                tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for row in chunk:
                on_file()
                _add(tar, f"{row.sample_key}.{row.extension}", store.get(row.store_key))
                _add(tar, f"{row.sample_key}.json",
                     json.dumps(row.columns, ensure_ascii=False).encode())
                files += 1
        shards += 1
    return files, 0, shards


def _chunks(rows: Iterator[FileRow], size: int) -> Iterator[Iterator[FileRow]]:
    """Consecutive runs of `size` rows, each consumed lazily (none held as a list)."""
    rows = iter(rows)
    while True:
        try:
            first = next(rows)
        except StopIteration:
            return
        yield _take(first, rows, size)


def _take(first: FileRow, rows: Iterator[FileRow], size: int) -> Iterator[FileRow]:
    yield first
    for _, row in zip(range(size - 1), rows, strict=False):
        yield row


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_parquet(rows: Iterator[FileRow], store: MediaStore, destination: Destination,
                   table: str, meta: list[MetadataColumn], embed: bool,
                   on_file: Callable[[], None]) -> tuple[int, int, int]:
    """One table, one row per file; `--embed` adds the bytes as a `content` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(meta, embed)
    files = 0
    with destination.open(table) as out, \
            pq.ParquetWriter(out, schema, compression="zstd") as writer:
        group: list[dict[str, Any]] = []
        group_bytes = 0
        for row in rows:
            on_file()
            record = dict(row.columns)
            if embed:
                record["content"] = store.get(row.store_key)
                group_bytes += len(record["content"])
            group.append(record)
            files += 1
            if len(group) >= ROW_GROUP_ROWS or group_bytes >= ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                group, group_bytes = [], 0
        if group or files == 0:
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
    return files, 0, 1


def parquet_schema(meta: list[MetadataColumn], embed: bool) -> Any:
    import pyarrow as pa

    text, number = pa.string(), pa.int64()
    types = {"custom_id": text, "prompt": text, "revised_prompt": text, "seed": number,
             "model": text, "width": number, "height": number, "content_type": text,
             "sha256": text, "cost_cents": number, "bytes": number, "uri": text,
             "line": number, "render": number, "index": number, "metadata": text,
             "request_id": text, "reused_from": text}
    kinds = {"string": text, "int": number, "float": pa.float64(), "bool": pa.bool_(),
             "json": text}
    fields = [pa.field(name, types[name]) for name in FILE_COLUMNS]
    fields += [pa.field(column.name, kinds[column.kind]) for column in meta]
    if embed:
        fields.append(pa.field("content", pa.binary()))
    return pa.schema(fields)
