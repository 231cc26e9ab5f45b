"""Storage without a store: keys and slugs (deterministic, one per attempt, always safe), which
URL opens which store, the proxy an S3 upload takes, and error messages that hide
credentials (the stores themselves: tests/integration/test_storage.py)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from pipeline import storage
from pipeline.storage import (
    S3Store,
    StorageError,
    media_key,
    open_store,
    safe_slug,
)
from tests.integration.test_storage import NASTY, SECRET


def test_media_key_shape() -> None:
    assert media_key(42, 7, "My Cat!", 3, 1, "png") == "job-000042/line-00007-my-cat/r003-i01.png"
    assert media_key(1, 0, None, 0, 0, ".PNG") == "job-000001/line-00000/r000-i00.png"
    assert media_key(1, 2, "", 0, 0, "mp4") == "job-000001/line-00002/r000-i00.mp4"
    assert media_key(1_234_567, 123_456, "x", 1000, 100, "webp") == (
        "job-1234567/line-123456-x/r1000-i100.webp"
    )


def test_each_attempt_of_a_render_has_keys_of_its_own() -> None:
    """A stale attempt (its worker froze past its lease) must not overwrite the files of the
    attempt that settled; the first attempt keeps the short key."""
    keys = {media_key(42, 7, "Cat", 3, 1, "png", attempt=a) for a in (1, 2, 3)}
    assert keys == {"job-000042/line-00007-cat/r003-i01.png",
                    "job-000042/line-00007-cat/r003-a02-i01.png",
                    "job-000042/line-00007-cat/r003-a03-i01.png"}
    for bad in (0, -1, True, "2"):
        with pytest.raises(ValueError, match="attempt"):
            media_key(42, 7, "Cat", 3, 1, "png", attempt=bad)


def test_media_key_is_deterministic() -> None:
    args = (9, 3, "Ünïcode ☃ id", 2, 1, "jpg")
    assert media_key(*args) == media_key(*args)


@pytest.mark.parametrize(
    "args",
    [
        (-1, 0, None, 0, 0, "png"),
        (1, -1, None, 0, 0, "png"),
        (1, 0, None, True, 0, "png"),
        (1, 0, None, 0, "1", "png"),
        (1, 0, None, 0, 0, "p/ng"),
        (1, 0, None, 0, 0, ""),
        (1, 0, None, 0, 0, "../png"),
    ],
)
def test_media_key_rejects_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        media_key(*args)


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("Hello World", "hello-world"),
        ("../../etc/passwd", "etc-passwd"),
        ("Café Müller", "cafe-muller"),
        ("...hidden", "hidden"),
        ("a  --  b", "a-b"),
        ("v1.2_final", "v1.2_final"),
        ("日本語", ""),
        ("", ""),
        (None, ""),
        ("nul\x00byte", "nul-byte"),
        ("．．／．．／etc", "etc"),
    ],
)
def test_safe_slug(text: str | None, slug: str) -> None:
    assert safe_slug(text) == slug


@pytest.mark.parametrize("text", NASTY)
def test_safe_slug_is_always_safe(text: str) -> None:
    slug = safe_slug(text)
    assert len(slug) <= 40
    assert set(slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-")
    assert not slug.startswith(".")
    assert slug not in (".", "..")


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/media", "http://example.com/media", "file://relative/dir",
     "file:relative", "media", "", "gs://bucket/x"],
)
def test_open_store_refuses_unsupported_urls(url: str) -> None:
    with pytest.raises(StorageError, match="file:///absolute/folder"):
        open_store(url)


def test_open_store_message_hides_credentials_in_url() -> None:
    with pytest.raises(StorageError) as info:
        open_store(f"s3://AKIAXXXX:{SECRET}@bucket/prefix")
    assert SECRET not in str(info.value)
    with pytest.raises(StorageError) as info:
        open_store(f"ftp://user:{SECRET}@host/media")
    assert SECRET not in str(info.value)


def test_open_store_s3_url() -> None:
    store = open_store("s3://my-bucket/team/media/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("my-bucket", "team/media")
    assert store.uri("a/b.png") == "s3://my-bucket/team/media/a/b.png"
    with pytest.raises(StorageError):
        open_store("s3://my-bucket/../etc")


def test_s3_put_async_takes_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,.internal")
    assert storage._proxy_for("https://b.s3.amazonaws.com/k?X-Amz-Signature=1") \
        == "http://proxy.example:3128"
    assert storage._proxy_for("https://minio.internal/b/k") is None
    assert storage._proxy_for("http://127.0.0.1:9000/b/k") is None
    monkeypatch.delenv("HTTPS_PROXY")
    assert storage._proxy_for("https://b.s3.amazonaws.com/k") is None


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("AccessDenied", "access denied"),
        ("InvalidAccessKeyId", "rejected the AWS credentials"),
        ("SignatureDoesNotMatch", "rejected the AWS credentials"),
        ("NoSuchBucket", "does not exist"),
        ("SlowDown", "SlowDown"),
    ],
)
def test_s3_error_messages(code: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    error = ClientError(
        {"Error": {"Code": code, "Message": f"signed with {SECRET}"}}, "PutObject"
    )
    message = str(storage._client_error(error, "upload", "s3://b/k", "b"))
    assert expected in message
    assert SECRET not in message
