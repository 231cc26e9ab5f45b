"""Storage: the local folder store, the S3 store against a real moto server, keys and slugs."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
import redis
import sqlalchemy as sa

from pipeline import storage
from pipeline.storage import (
    FileStore,
    ObjectNotFound,
    S3Store,
    StorageError,
    check_key,
    media_key,
    open_store,
    probe,
)
from tests.helpers import use_s3
from tests.servers import start_moto, start_postgres, start_redis

SECRET = "s3cr3t-never-printed-Zq9"

NASTY = [
    "../../etc/passwd",
    "..",
    ".",
    "/abs/path",
    "a/../../b",
    "..\\..\\windows",
    "C:\\Windows",
    "nul\x00byte",
    "．．／．．／etc",  # fullwidth dots and slash: NFKC would make "../../etc"
    "\u202eevil\u202c.png",  # right-to-left override
    "a\u2028b\u2029c",
    "~/.ssh/id_rsa",
    "%2e%2e%2f",
    ".hidden",
    "...",
    "   ",
    "😀🔥",
    "x" * 500,
    "CON",
    "a\nb\rc\td",
]


# --- keys and slugs --------------------------------------------------------------------------


@pytest.mark.parametrize("custom_id", NASTY)
def test_media_key_never_escapes(custom_id: str, tmp_path: Path) -> None:
    key = media_key(5, 1, custom_id, 0, 0, "png")
    assert check_key(key) == key
    assert len(key.split("/")) == 3
    store = FileStore(tmp_path / "root")
    store.put(key, b"data", "image/png")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1
    assert written[0].resolve().is_relative_to((tmp_path / "root").resolve())


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "../x", "a/../b", "a/./b", "a//b", "a/", "a\\b", "a\x00b", ".tmp-x",
     "a/.hidden", "a b", "é", "a/b:c", 42],
)
def test_bad_keys_are_refused(key: str, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(StorageError):
        store.put(key, b"x", "image/png")
    with pytest.raises(StorageError):
        store.size(key)
    assert list(tmp_path.iterdir()) == []


# --- open_store --------------------------------------------------------------------------


def test_open_store_file_url(tmp_path: Path) -> None:
    folder = tmp_path / "with space" / "media"
    store = open_store(folder.as_uri())
    assert isinstance(store, FileStore)
    assert store.root == folder
    assert open_store(f"file://localhost{folder}").root == folder  # type: ignore[attr-defined]


# --- file store --------------------------------------------------------------------------


def test_file_store_round_trip(tmp_path: Path) -> None:
    store = open_store((tmp_path / "media").as_uri())
    key = media_key(1, 2, "cat", 0, 1, "png")
    uri = store.put(key, b"\x89PNG data", "image/png")
    path = tmp_path / "media" / key
    assert uri == path.as_uri() == store.uri(key)
    assert path.read_bytes() == b"\x89PNG data"
    assert store.get(key) == b"\x89PNG data"
    assert store.size(key) == 9
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_file_store_put_async_from_a_loop(tmp_path: Path) -> None:
    store = open_store((tmp_path / "media").as_uri())
    keys = [media_key(1, line, None, 0, 0, "png") for line in range(40)]

    async def upload_all() -> list[str]:
        try:
            return await asyncio.gather(*(store.put_async(key, key.encode(), "image/png")
                                          for key in keys))
        finally:
            await store.aclose()

    uris = asyncio.run(upload_all())
    assert uris == [store.uri(key) for key in keys]
    assert [store.get(key) for key in keys] == [key.encode() for key in keys]


def test_file_store_missing(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    assert store.size("job-000001/nothing.png") is None
    assert store.size("job-000001") is None
    with pytest.raises(ObjectNotFound):
        store.get("job-000001/nothing.png")
    assert store.keys() == []
    assert FileStore(tmp_path / "absent").keys() == []


def test_file_store_overwrites(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("a/b.png", b"first", "image/png")
    store.put("a/b.png", b"second!", "image/png")
    assert store.get("a/b.png") == b"second!"
    assert store.keys() == ["a/b.png"]


def test_file_store_keys(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    keys = [
        media_key(1, 1, "x", 0, 0, "png"),
        media_key(1, 2, None, 0, 1, "png"),
        media_key(12, 1, None, 0, 0, "png"),
        media_key(2, 1, None, 0, 0, "png"),
    ]
    for key in keys:
        store.put(key, b"x", "image/png")
    (tmp_path / "job-000001" / ".tmp-leftover.part").write_bytes(b"half")
    assert store.keys() == sorted(keys)
    assert store.keys("job-000001/") == sorted(keys[:2])
    assert store.keys("job-000001/line-00002") == [keys[1]]
    assert store.keys("job-00001") == [keys[2]]
    assert store.keys("job-000009/") == []
    with pytest.raises(StorageError):
        store.keys("../")


def test_file_store_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path)
    store.put("a/b.png", b"old", "image/png")

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="No space left"):
        store.put("a/b.png", b"new-bytes", "image/png")
    with pytest.raises(StorageError):
        store.put("a/c.png", b"new-bytes", "image/png")
    assert store.get("a/b.png") == b"old"
    assert store.size("a/c.png") is None
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.png"]  # no temp left


def test_file_store_crash_mid_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path)

    def killed(fd: int) -> None:
        raise KeyboardInterrupt  # stands for a worker killed between write and rename

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        store.put("a/b.png", b"x" * 100_000, "image/png")
    assert store.size("a/b.png") is None
    assert list((tmp_path / "a").iterdir()) == []


def test_file_store_concurrent_writers(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    payloads = [bytes([i]) * 50_000 for i in range(16)]
    threads = [
        threading.Thread(target=store.put, args=("same/key.png", data, "image/png"))
        for data in payloads
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("same/key.png") in payloads
    assert store.keys() == ["same/key.png"]


def test_file_store_unwritable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    store = FileStore(blocker / "media")
    with pytest.raises(StorageError, match="cannot"):
        store.put("a/b.png", b"x", "image/png")
    with pytest.raises(StorageError):
        store.check()


# --- S3 against a real moto server over HTTP -------------------------------------------------

BUCKET = "imagebatch-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> object:
    endpoint, stop = start_moto()
    with pytest.MonkeyPatch.context() as mp:
        use_s3(mp, endpoint, SECRET)
        boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    stop()


@pytest.fixture
def s3(s3_endpoint: str, request: pytest.FixtureRequest) -> S3Store:
    """A store under a prefix of its own, so tests do not see each other's objects."""
    store = open_store(f"s3://{BUCKET}/t-{request.node.name[:60].replace('[', '-')}")
    assert isinstance(store, S3Store)
    return store


def _raw_client() -> object:
    return boto3.session.Session().client("s3")


def test_s3_round_trip(s3: S3Store) -> None:
    key = media_key(42, 7, "Cat", 3, 1, "png")
    uri = s3.put(key, b"\x89PNG bytes", "image/png")
    assert uri == f"s3://{BUCKET}/{s3.prefix}/{key}" == s3.uri(key)
    assert s3.get(key) == b"\x89PNG bytes"
    assert s3.size(key) == 10
    head = _raw_client().head_object(Bucket=BUCKET, Key=f"{s3.prefix}/{key}")
    assert head["ContentType"] == "image/png"


def _put_async(store: S3Store, key: str, data: bytes, content_type: str = "image/png") -> str:
    async def upload() -> str:
        try:
            return await store.put_async(key, data, content_type)
        finally:
            await store.aclose()

    return asyncio.run(upload())


def test_s3_put_async_round_trip(s3: S3Store, caplog: pytest.LogCaptureFixture) -> None:
    """The loop's upload stores what `put` stores, without falling back to boto3."""
    caplog.set_level(logging.DEBUG, logger="imagebatch.storage")
    key = media_key(42, 7, "Cat", 3, 1, "webp")
    assert _put_async(s3, key, b"RIFF bytes", "image/webp") == s3.uri(key)
    assert s3.get(key) == b"RIFF bytes"
    head = _raw_client().head_object(Bucket=BUCKET, Key=f"{s3.prefix}/{key}")
    assert head["ContentType"] == "image/webp"
    assert "presigned upload" not in caplog.text


def test_s3_put_async_is_signed_with_sigv4_over_the_content_type(s3_endpoint: str) -> None:
    """SigV2 presigned URLs are refused by S3 regions opened since 2014 and by other servers."""
    url = storage.s3_client().generate_presigned_url(
        "put_object", Params={"Bucket": BUCKET, "Key": "k.png", "ContentType": "image/png"})
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    assert "X-Amz-SignedHeaders=content-type%3Bhost" in url


def test_s3_put_async_many_at_once(s3: S3Store) -> None:
    keys = [f"loop/k{i:03d}.png" for i in range(100)]

    async def upload_all() -> list[str]:
        try:
            return await asyncio.gather(*(s3.put_async(key, bytes([i]) * 5_000, "image/png")
                                          for i, key in enumerate(keys)))
        finally:
            await s3.aclose()

    assert asyncio.run(upload_all()) == [s3.uri(key) for key in keys]
    assert s3.keys("loop/") == keys
    assert s3.get(keys[7]) == bytes([7]) * 5_000


def test_s3_put_async_failure_is_reported_by_boto3(
    s3_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused upload gets boto3's message, and the presigned URL (a credential) is not
    logged."""
    caplog.set_level(logging.DEBUG)
    store = open_store("s3://no-such-bucket-here/media")
    assert isinstance(store, S3Store)
    with pytest.raises(StorageError, match="'no-such-bucket-here' does not exist"):
        _put_async(store, "a/b.png", b"x")
    assert "presigned upload to s3://no-such-bucket-here/media/a/b.png failed (HTTP 404)" \
        in caplog.text
    assert "X-Amz-Signature" not in caplog.text
    assert SECRET not in caplog.text


def test_s3_put_async_unreachable_endpoint(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _point_at_nothing(monkeypatch)
    store = open_store(f"s3://{BUCKET}/x")
    assert isinstance(store, S3Store)
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        _put_async(store, "a/b.png", b"x")


def _point_at_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the S3 client at a loopback port where nothing listens, with no retries."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


def test_s3_missing_object(s3: S3Store) -> None:
    assert s3.size("job-000001/missing.png") is None
    with pytest.raises(ObjectNotFound):
        s3.get("job-000001/missing.png")


def test_s3_overwrite_and_keys(s3: S3Store) -> None:
    keys = [media_key(1, line, None, 0, i, "png") for line in (1, 2) for i in (0, 1)]
    keys.append(media_key(12, 1, None, 0, 0, "png"))
    for key in keys:
        s3.put(key, b"one", "image/png")
    s3.put(keys[0], b"two", "image/png")
    assert s3.get(keys[0]) == b"two"
    assert s3.keys() == sorted(keys)
    assert s3.keys("job-000001/") == sorted(keys[:4])
    assert s3.keys("job-000001/line-00002/") == sorted(keys[2:4])
    assert s3.keys("job-000099/") == []


def test_s3_keys_paginate(s3: S3Store) -> None:
    keys = [f"many/k{i:02d}.bin" for i in range(11)]
    for key in keys:
        s3.put(key, b"", "application/octet-stream")
    s3.page_size = 3
    calls = []

    def count(**kwargs: object) -> None:
        calls.append(1)

    events = storage.s3_client().meta.events
    events.register("before-call.s3.ListObjectsV2", count)
    try:
        assert s3.keys("many/") == keys
    finally:
        events.unregister("before-call.s3.ListObjectsV2", count)
    assert len(calls) == 4


def test_s3_store_without_prefix(s3_endpoint: str) -> None:
    store = open_store(f"s3://{BUCKET}")
    assert store.put("root-level/x.png", b"x", "image/png") == f"s3://{BUCKET}/root-level/x.png"
    assert store.keys("root-level/") == ["root-level/x.png"]


def test_s3_missing_bucket(s3_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket-here/media")
    for call in (
        lambda: store.put("a/b.png", b"x", "image/png"),
        lambda: store.keys(),
        lambda: store.get("a/b.png"),
        store.check,
    ):
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert "no-such-bucket-here" in message
        assert "Traceback" not in message
        assert SECRET not in message
    with pytest.raises(StorageError, match="does not exist"):
        store.check()


def test_s3_check_passes(s3: S3Store) -> None:
    s3.check()


def test_probe_writes_and_deletes_and_refuses_what_cannot_keep_results(
        s3: S3Store, s3_endpoint: str, tmp_path: Path) -> None:
    probe(s3)
    assert s3.keys() == []
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        probe(open_store("s3://no-such-bucket-here/media"))
    folder = FileStore(tmp_path / "media")
    probe(folder)
    assert folder.keys() == [] and list((tmp_path / "media").iterdir()) == []
    (tmp_path / "blocker").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot"):
        probe(FileStore(tmp_path / "blocker" / "media"))


def test_delete_removes_an_object_and_ignores_a_missing_one(s3: S3Store, tmp_path: Path
                                                             ) -> None:
    for store in (s3, FileStore(tmp_path)):
        store.put("job-000001/a.png", b"x", "image/png")
        store.delete("job-000001/a.png")
        store.delete("job-000001/a.png")
        assert store.keys() == []


def test_s3_client_is_cached_per_process(s3_endpoint: str) -> None:
    assert storage.s3_client() is storage.s3_client()
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(storage.s3_client()))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(client) for client in seen}) == 1


def test_s3_concurrent_puts(s3: S3Store) -> None:
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            s3.put(f"par/k{i:03d}.png", bytes([i]) * 10_000, "image/png")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(s3.keys("par/")) == 32


def test_s3_no_credentials(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{BUCKET}/x")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        store.put("a/b.png", b"x", "image/png")


def test_s3_unreachable_endpoint(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _point_at_nothing(monkeypatch)
    store = open_store(f"s3://{BUCKET}/x")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        store.size("a/b.png")


def test_moto_answers_expect_100_continue(s3_endpoint: str) -> None:
    """Without an interim 100 response, every boto3 PUT stalls about a second."""
    parts = urlsplit(s3_endpoint)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(
            f"PUT /{BUCKET}/expect-check HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        started = time.monotonic()
        first = sock.recv(1024)
        assert first.startswith(b"HTTP/1.1 100"), first
        assert time.monotonic() - started < 0.5


# --- the other real servers start ------------------------------------------------------------


def test_redis_server_starts() -> None:
    url, stop = start_redis()
    try:
        client = redis.Redis.from_url(url)
        assert client.ping()
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
    finally:
        stop()


def test_postgres_server_starts() -> None:
    url, stop = start_postgres()
    try:
        assert url.startswith("postgresql+psycopg://")
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
            assert conn.execute(sa.text("select current_database()")).scalar() == "imagebatch"
        engine.dispose()
    finally:
        stop()
