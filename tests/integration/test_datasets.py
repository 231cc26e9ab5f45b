"""Dataset exports (issue 19 item 1) loaded back by the real `datasets`, `webdataset` and
`pyarrow` packages, from a local folder and from S3 (moto server over HTTP)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import pytest

from pipeline.datasets import ExportError, export_dataset
from tests.helpers import assert_books_balance, run_job, use_s3

FLUX = {"model": "flux-2-dev", "prompt": "an otter"}  # 3 cents an image
SUNO = {"model": "suno-v5", "prompt": "a song"}  # 5 cents, audio
BUCKET = "imagebatch-exports"
AWS_SECRET = "aws-SECRET-never-printed-0123456789"

LINES = [
    {**FLUX, "n": 3, "seed": 7, "custom_id": "otters", "fake": {"revised_prompt": "two otters"},
     "metadata": {"split": "train", "label": "otter", "score": 1, "tags": ["a"]}},
    {**FLUX, "prompt": "a fox", "custom_id": "fox",
     "metadata": {"split": "test", "label": "fox", "score": 0.5, "index": 9}},
    {**SUNO, "custom_id": "song", "metadata": {"split": "train", "label": "song"}},
]


def job(svc) -> int:
    s = run_job(svc, LINES)
    assert s["status"] == "succeeded" and s["images"] == 5
    assert_books_balance(svc, s["id"])
    return s["id"]


def export(svc, job_id: int, fmt: str, target: str, **options) -> dict:
    with svc.sessions() as session:
        return export_dataset(session, job_id, svc.store, fmt, target, **options).as_dict()


def stored_sha256(svc, uri: str) -> str:
    key = uri.split("/job-", 1)[1]
    return hashlib.sha256(svc.store.get("job-" + key)).hexdigest()


# --- hf --------------------------------------------------------------------------------------


def load_imagefolder(folder: Path):
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder),
                                   cache_dir=str(folder.parent / "hf-cache"))
    return {name: split.cast_column("image", datasets.Image(decode=False))
            for name, split in loaded.items()}


def check_imagefolder(svc, folder: Path) -> None:
    splits = load_imagefolder(folder)
    assert sorted(splits) == ["test", "train"]
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (3, 1)  # the song is skipped: imagefolder has no audio
    for name in ("custom_id", "prompt", "revised_prompt", "seed", "model", "width", "height",
                 "content_type", "sha256", "cost_cents", "uri", "label", "score",
                 "metadata_index", "tags"):
        assert name in train.column_names, name
    rows = sorted(train, key=lambda r: r["seed"])
    assert [r["seed"] for r in rows] == [7, 8, 9]
    first = rows[0]
    assert (first["custom_id"], first["prompt"], first["revised_prompt"]) == (
        "otters", "an otter", "two otters")
    assert (first["model"], first["content_type"], first["cost_cents"]) == (
        "flux-2-dev", "image/png", 3)
    assert (first["label"], first["score"]) == ("otter", 1.0)  # 1 and 0.5: a float column
    assert json.loads(first["tags"]) == ["a"]  # a list: JSON text
    for row in [*train, *test]:
        image = row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes()
        assert hashlib.sha256(image).hexdigest() == row["sha256"]
        assert row["sha256"] == stored_sha256(svc, row["uri"])
    fox = test[0]
    assert (fox["custom_id"], fox["prompt"], fox["metadata_index"]) == ("fox", "a fox", 9)
    assert fox["width"] > 0 and fox["height"] > 0


def test_hf_export_loads_with_datasets_with_splits_and_columns(svc, fake, tmp_path):
    job_id = job(svc)
    summary = export(svc, job_id, "hf", str(tmp_path / "hf"))
    assert (summary["files"], summary["skipped"], summary["outputs"]) == (4, 1, 2)
    check_imagefolder(svc, tmp_path / "hf")
    assert not list((tmp_path / "hf").rglob("*.part"))


# --- webdataset ------------------------------------------------------------------------------


def iterate_shards(folder: Path) -> list[dict]:
    import webdataset

    urls = [str(p) for p in sorted(folder.glob("shard-*.tar"))]
    return list(webdataset.WebDataset(urls, shardshuffle=False))


def check_shards(svc, folder: Path, shards: int) -> None:
    assert [p.name for p in sorted(folder.glob("shard-*.tar"))] == [
        f"shard-{i:06d}.tar" for i in range(shards)]
    samples = iterate_shards(folder)
    assert len(samples) == 5
    types = set()
    for sample in samples:
        columns = json.loads(sample["json"])
        media = next(v for k, v in sample.items() if k in ("png", "mp3"))
        assert hashlib.sha256(media).hexdigest() == columns["sha256"]
        assert columns["sha256"] == stored_sha256(svc, columns["uri"])
        assert "." not in sample["__key__"]
        types.add(columns["content_type"])
    assert types == {"image/png", "audio/mpeg"}  # audio and video are samples like images
    song = next(json.loads(s["json"]) for s in samples if "mp3" in s)
    assert (song["custom_id"], song["cost_cents"], song["label"]) == ("song", 5, "song")


def test_webdataset_export_iterates_every_sample_in_shards_of_shard_size(svc, fake, tmp_path):
    job_id = job(svc)
    summary = export(svc, job_id, "webdataset", str(tmp_path / "wds"), shard_size=2)
    assert (summary["files"], summary["outputs"]) == (5, 3)
    check_shards(svc, tmp_path / "wds", shards=3)


# --- parquet ---------------------------------------------------------------------------------


def check_table(svc, table, *, embedded: bool) -> None:
    assert table.num_rows == 5
    rows = table.to_pylist()
    assert [r["custom_id"] for r in rows] == ["otters"] * 3 + ["fox", "song"]
    assert [r["cost_cents"] for r in rows] == [3, 3, 3, 3, 5]
    assert [r["score"] for r in rows] == [1.0, 1.0, 1.0, 0.5, None]
    for row in rows:
        assert row["sha256"] == stored_sha256(svc, row["uri"])
        assert row["uri"].startswith("file://")
        if embedded:
            assert hashlib.sha256(row["content"]).hexdigest() == row["sha256"]
    assert ("content" in table.column_names) == embedded


def test_parquet_export_reads_back_with_pyarrow_with_and_without_the_bytes(svc, fake,
                                                                           tmp_path):
    import pyarrow.parquet as pq

    job_id = job(svc)
    summary = export(svc, job_id, "parquet", str(tmp_path / "files.parquet"))
    assert (summary["files"], summary["outputs"]) == (5, 1)
    check_table(svc, pq.read_table(tmp_path / "files.parquet"), embedded=False)
    (tmp_path / "folder").mkdir()
    export(svc, job_id, "parquet", str(tmp_path / "folder"), embed=True)  # a folder: job-N
    check_table(svc, pq.read_table(tmp_path / "folder" / f"job-{job_id:06d}.parquet"),
                embedded=True)


# --- S3 --------------------------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    use_s3(monkeypatch, s3_endpoint, AWS_SECRET)
    boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
    return s3_endpoint


def download(prefix: str, folder: Path) -> None:
    client = boto3.session.Session().client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", ()):
            path = folder / obj["Key"][len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, obj["Key"], str(path))


def test_every_dataset_format_exports_to_s3_and_loads_from_there(svc, fake, tmp_path, s3_env,
                                                                 request):
    import pyarrow.fs
    import pyarrow.parquet as pq

    job_id = job(svc)
    prefix = f"{request.node.callspec.id}-{job_id}"
    export(svc, job_id, "hf", f"s3://{BUCKET}/{prefix}/hf/")
    download(f"{prefix}/hf/", tmp_path / "hf")
    check_imagefolder(svc, tmp_path / "hf")
    export(svc, job_id, "webdataset", f"s3://{BUCKET}/{prefix}/wds", shard_size=4)
    download(f"{prefix}/wds/", tmp_path / "wds")
    check_shards(svc, tmp_path / "wds", shards=2)
    with pytest.raises(ExportError, match=f"/{prefix}/wds/: not empty"):
        export(svc, job_id, "webdataset", f"s3://{BUCKET}/{prefix}/wds", shard_size=1)
    export(svc, job_id, "parquet", f"s3://{BUCKET}/{prefix}/t.parquet", embed=True)
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=s3_env, access_key="test",
                                 secret_key=AWS_SECRET, region="us-east-1")
    check_table(svc, pq.read_table(f"{BUCKET}/{prefix}/t.parquet", filesystem=s3),
                embedded=True)


def test_a_missing_bucket_or_an_unwritable_folder_is_one_clear_error(svc, fake, tmp_path,
                                                                     s3_env):
    job_id = job(svc)
    with pytest.raises(ExportError, match="S3 bucket 'no-such-bucket' does not exist") as e:
        export(svc, job_id, "webdataset", "s3://no-such-bucket/x/")
    assert AWS_SECRET not in str(e.value)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export(svc, job_id, "hf", str(a_file))
    with pytest.raises(ExportError, match="a-file/wds: cannot write here"):
        export(svc, job_id, "webdataset", str(a_file / "wds"))


def test_a_dataset_folder_that_holds_files_is_refused_so_no_stale_shard_is_loaded(
        svc, fake, tmp_path):
    job_id = job(svc)
    export(svc, job_id, "webdataset", str(tmp_path / "wds"), shard_size=1)
    with pytest.raises(ExportError, match="wds: not empty"):
        export(svc, job_id, "webdataset", str(tmp_path / "wds"), shard_size=5)
    assert len(list((tmp_path / "wds").glob("shard-*.tar"))) == 5  # the first export, intact
    export(svc, job_id, "parquet", str(tmp_path / "t.parquet"))
    export(svc, job_id, "parquet", str(tmp_path / "t.parquet"))  # one file: replaced whole


# --- jsonl and csv ---------------------------------------------------------------------------


def test_jsonl_and_csv_rows_go_to_a_file_a_folder_or_s3(svc, fake, tmp_path, s3_env):
    from pipeline.datasets import open_rows_output
    from pipeline.export import export_rows, write_export

    job_id = job(svc)
    (tmp_path / "rows").mkdir()
    for target in (str(tmp_path / "rows.jsonl"), str(tmp_path / "rows"),
                   f"s3://{BUCKET}/rows-{job_id}/r.jsonl"):
        with svc.sessions() as session, open_rows_output(target, "job.jsonl") as out:
            assert write_export(export_rows(session, job_id, svc.store.uri), out, "jsonl") == 5
    client = boto3.session.Session().client("s3")
    from_s3 = client.get_object(Bucket=BUCKET, Key=f"rows-{job_id}/r.jsonl")["Body"].read()
    local = (tmp_path / "rows.jsonl").read_bytes()
    assert from_s3 == local == (tmp_path / "rows" / "job.jsonl").read_bytes()
    assert [json.loads(line)["custom_id"] for line in local.splitlines()] == [
        "otters", "otters", "otters", "fox", "song"]


def test_jsonl_and_csv_rows_carry_the_prompt_and_each_metadata_key_as_a_column(svc, fake):
    import csv
    import io

    from pipeline.export import export_rows, write_export

    job_id = job(svc)

    def exported(fmt: str) -> str:
        out = io.StringIO()
        with svc.sessions() as session:
            assert write_export(export_rows(session, job_id, svc.store.uri), out, fmt) == 5
        return out.getvalue()

    records = [json.loads(line) for line in exported("jsonl").splitlines()]
    assert [(r["prompt"], r["label"], r["score"]) for r in records] == [
        ("an otter", "otter", 1)] * 3 + [("a fox", "fox", 0.5), ("a song", "song", None)]
    assert records[0]["tags"] == ["a"] and records[3]["metadata_index"] == 9  # exact values
    assert records[3]["index"] == 0  # the file's own column is not overwritten by metadata
    rows = list(csv.DictReader(io.StringIO(exported("csv"), newline="")))
    assert list(rows[0])[-6:] == ["prompt", "split", "label", "score", "tags",
                                  "metadata_index"]
    assert [(r["prompt"], r["label"], r["tags"]) for r in rows][::3] == [
        ("an otter", "otter", '["a"]'), ("a fox", "fox", "")]
