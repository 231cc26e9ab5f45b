"""Media storage: a local folder (file://) or an S3 bucket (s3://), behind one small interface."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import ssl
import stat
import threading
import unicodedata
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit
from urllib.request import url2pathname

__all__ = [
    "FileStore",
    "MediaStore",
    "ObjectNotFound",
    "S3Store",
    "StorageError",
    "media_key",
    "open_store",
    "probe",
    "safe_slug",
]

log = logging.getLogger("imagebatch.storage")


class StorageError(Exception):
    """Storage is misconfigured or refused us; the message is safe to show (no secrets)."""


class ObjectNotFound(StorageError):
    """The key holds no object."""


class MediaStore(Protocol):
    """Where media bytes go. Keys are relative, '/'-separated, made by `media_key`."""

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store `data` under `key` (replacing any object there) and return its URI."""
        ...

    async def put_async(self, key: str, data: bytes, content_type: str) -> str:
        """`put` for the event loop: the same result, without blocking the loop."""
        ...

    async def aclose(self) -> None:
        """Release what `put_async` opened; call it on the loop that used it."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes under `key`; raises ObjectNotFound when there are none."""
        ...

    def size(self, key: str) -> int | None:
        """The size in bytes of the object under `key`, or None when it is missing."""
        ...

    def keys(self, prefix: str = "") -> list[str]:
        """Every key starting with `prefix`, sorted."""
        ...

    def uri(self, key: str) -> str:
        """The file:// or s3:// URI of `key` (whether or not it exists)."""
        ...

    def check(self) -> None:
        """Raise StorageError unless the store is reachable (folder usable, bucket exists)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object under `key`; nothing to do when there is none."""
        ...

    def copy(self, source: str, key: str, size: int) -> None:
        """Store under `key` the object under `source` (`size` bytes), whole or not at all,
        without its bytes passing through this process where the store allows it (seeded
        reuse); ObjectNotFound when `source` holds none."""
        ...


def probe(store: MediaStore) -> None:
    """Write and delete a small object: StorageError unless results can be kept. Run before
    the first call, so nothing is bought that cannot be stored (a read-only folder, a bucket
    that refuses writes)."""
    store.check()
    key = f"imagebatch-probe-{uuid.uuid4().hex}.txt"
    store.put(key, b"imagebatch checks that it can store results here\n", "text/plain")
    store.delete(key)


def open_store(storage_url: str, *, connections: int = 64) -> MediaStore:
    """A store for `file:///abs/dir` or `s3://bucket/prefix`; StorageError for anything else.
    `connections`: the uploads an S3 store may send at once (its HTTP pool's size)."""
    parts = urlsplit(storage_url.strip())
    scheme = parts.scheme.lower()
    if scheme == "s3":
        return _open_s3(storage_url, parts, connections)
    if scheme == "file":
        return _open_file(storage_url, parts)
    if scheme == "" and storage_url.startswith("/"):
        return FileStore(Path(storage_url))
    raise StorageError(
        f"unsupported storage URL {_redact_url(storage_url)!r} (IMAGEBATCH_STORAGE_URL): "
        "use file:///absolute/folder or s3://bucket/prefix"
    )


# --- keys ------------------------------------------------------------------------------------

_SLUG_MAX = 40
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_EXTENSION = re.compile(r"[a-z0-9]{1,10}")
_KEY_MAX_BYTES = 1024  # S3's limit on a whole key


def safe_slug(text: str | None) -> str:
    """A filesystem- and URL-safe slug: [a-z0-9._-], lowercased, ≤ 40 chars, no leading dot.

    Accents are folded (café -> cafe); every run of other characters (slashes, NUL, spaces,
    scripts without an ASCII form) becomes one '-'. The result can be empty.
    """
    if text is None:
        return ""
    decomposed = unicodedata.normalize("NFKD", str(text))
    folded = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", folded)
    slug = re.sub(r"-{2,}", "-", slug).lstrip("._-").rstrip(".-")
    return slug[:_SLUG_MAX].rstrip(".-")


def media_key(
    job_id: int,
    line: int,
    custom_id: str | None,
    render_index: int,
    image_index: int,
    extension: str,
    attempt: int = 1,
) -> str:
    """The deterministic key of one stored image, e.g. job-000042/line-00007-cat/r003-i01.png
    (a render's first attempt) or .../r003-a02-i01.png (its second).

    Only the numbers make it unique; the custom_id slug is there for humans to read. Each
    attempt has keys of its own: an attempt whose worker froze past its lease, and whose
    render was done again meanwhile, must not write over the bytes the image rows describe.
    """
    for name, value in (
        ("job_id", job_id), ("line", line),
        ("render_index", render_index), ("image_index", image_index),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    ext = str(extension).lower().lstrip(".")
    if not _EXTENSION.fullmatch(ext):
        raise ValueError(f"bad media extension {extension!r}")
    slug = safe_slug(custom_id)
    item = f"line-{line:05d}-{slug}" if slug else f"line-{line:05d}"
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be a positive integer, not {attempt!r}")
    tries = f"-a{attempt:02d}" if attempt > 1 else ""
    return f"job-{job_id:06d}/{item}/r{render_index:03d}{tries}-i{image_index:02d}.{ext}"


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise StorageError.

    Segments are [A-Za-z0-9._-], never empty, never starting with '.' (so no '.', '..' and
    no clash with the file store's temporary files); no leading '/', no backslash, no NUL.
    """
    if not isinstance(key, str) or not key or len(key.encode()) > _KEY_MAX_BYTES:
        raise StorageError(f"invalid storage key {key!r}")
    if not all(_SEGMENT.fullmatch(segment) for segment in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}: use media_key() to build keys")
    return key


def _check_prefix(prefix: str) -> str:
    """A listing prefix: a key, a partial key, or a key followed by '/'; '' lists all."""
    if prefix == "":
        return prefix
    check_key(prefix.removesuffix("/") if prefix.endswith("/") else prefix)
    return prefix


# --- local folder ----------------------------------------------------------------------------

_TMP_PREFIX = ".tmp-"


def _open_file(storage_url: str, parts: Any) -> FileStore:
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise StorageError(
            f"bad file storage URL {_redact_url(storage_url)!r}: use file:///absolute/folder"
        )
    path = Path(url2pathname(parts.path))
    if not path.is_absolute():
        raise StorageError(
            f"file storage URL {storage_url!r} must name an absolute folder: "
            "use file:///absolute/folder"
        )
    return FileStore(path)


class FileStore:
    """Media in a local folder. Writes go to a temporary file then `os.replace`: atomic."""

    # Writes from the loop run on threads of the store's own: a write waits on its fsync.
    writer_threads = 16

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._writers: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        path = self._path(key)
        try:
            try:
                _write_atomically(path, bytes(data))
            except FileNotFoundError:  # the key's folder is new: make it only then
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(path, bytes(data))
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path.as_uri()

    async def put_async(self, key: str, data: bytes,
                        content_type: str = "application/octet-stream") -> str:
        if self._writers is None:
            self._writers = ThreadPoolExecutor(self.writer_threads,
                                               thread_name_prefix="imagebatch-files")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writers, self.put, key, data, content_type)

    async def aclose(self) -> None:
        if self._writers is not None:
            self._writers.shutdown(wait=False)  # queued writes still finish
            self._writers = None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object at {path}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None

    def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat {path}: {exc.strerror or exc}") from None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def keys(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        folder, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        found = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(".") and key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror or exc}") from None

    def copy(self, source: str, key: str, size: int) -> None:
        """A hard link (no bytes copied), else a copy; either appears under `key` by a rename,
        so no reader sees a half-written file. Files are never rewritten in place (`put`
        renames a new file over the old), so the linked bytes never change under the copy."""
        original, path = self._path(source), self._path(key)
        try:
            try:
                _link_or_copy_atomically(original, path)
            except FileNotFoundError:
                if not original.is_file():
                    raise ObjectNotFound(f"no object at {original}") from None
                path.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy_atomically(original, path)
        except OSError as exc:
            raise StorageError(f"cannot copy {original} to {path}: {exc.strerror or exc}"
                               ) from None

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.root}: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage folder {self.root} is not writable")


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to make the file under; renamed over `path` when the
    block ends, removed if it fails: `path` is whole or as it was, never half written."""
    tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}.part"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename it over `path`."""
    with _replacing(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.chmod(tmp, 0o644)


def _link_or_copy_atomically(original: Path, path: Path) -> None:
    """`original` linked (or, where links are refused, copied and fsynced) under a temporary
    name beside `path`, then renamed over it."""
    with _replacing(path) as tmp:
        try:
            os.link(original, tmp)
        except FileNotFoundError:
            raise
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(original, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)


# --- S3 --------------------------------------------------------------------------------------

_BUCKET = re.compile(r"[A-Za-z0-9._-]{3,255}")
_COPY_OBJECT_MAX = 5 * 1024**3  # S3 copies at most 5 GiB in one CopyObject
_PRESIGNED_SECONDS = 300  # used at once; long enough for a slow upload to start
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
)


def _open_s3(storage_url: str, parts: Any, connections: int) -> S3Store:
    bucket = parts.netloc
    if "@" in bucket or parts.query or parts.fragment or not _BUCKET.fullmatch(bucket):
        raise StorageError(
            f"bad S3 storage URL {_redact_url(storage_url)!r}: use s3://bucket/prefix "
            "(credentials come from AWS_* variables, never from the URL)"
        )
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except StorageError:
            raise StorageError(
                f"bad prefix {prefix!r} in S3 storage URL: use [A-Za-z0-9._-] segments"
            ) from None
    return S3Store(bucket, prefix, connections=connections)


def s3_client() -> Any:
    """The process's S3 client (created once: it costs 120-180 ms; clients are thread-safe).

    boto3 reads AWS_* variables itself (AWS_ENDPOINT_URL_S3 included). The cache is keyed by
    process id, so a forked child makes its own, and by the variables that pick the endpoint
    and account, so tests that point it at another server get a fresh one.
    """
    cache_key = (os.getpid(), *(os.environ.get(name) for name in _CLIENT_ENV))
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = _clients[cache_key] = _new_s3_client()
        return client


def _forget_clients_after_fork() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()  # the parent may have held it mid-fork
    _clients.clear()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


def _new_s3_client() -> Any:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    config = Config(
        signature_version="s3v4",  # presigned URLs too (botocore would presign with SigV2)
        retries={"mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=64,
    )
    try:
        return boto3.session.Session().client("s3", config=config)
    except BotoCoreError as exc:
        raise StorageError(f"cannot configure the S3 client: {_scrub(str(exc))}") from None


class S3Store:
    """Media in an S3 (or S3-compatible) bucket under an optional prefix."""

    page_size = 1000  # keys per list request (S3's maximum)

    def __init__(self, bucket: str, prefix: str = "", *, connections: int = 64) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.connections = max(1, connections)
        self._http: Any = None  # put_async's httpx client, made on the loop that uses it
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._fallbacks = 0

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, {self.prefix!r})"

    @property
    def _client(self) -> Any:
        return s3_client()

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        full = self._full(key)
        with self._errors("upload", full):
            # bytes, not a stream: a retry resends the whole body.
            self._client.put_object(
                Bucket=self.bucket, Key=full, Body=bytes(data), ContentType=content_type
            )
        return self.uri(key)

    async def put_async(self, key: str, data: bytes,
                        content_type: str = "application/octet-stream") -> str:
        """boto3 signs a presigned PUT and httpx (over aiohttp) sends it from the loop: about a
        third of `put_object`'s CPU (which runs botocore's whole request pipeline per call) and no
        thread. Any answer but success is redone by `put` on a thread, so failures get
        boto3's retries, region redirects and error messages."""
        full = self._full(key)
        with self._errors("upload", full):
            url = self._client.generate_presigned_url(
                "put_object", ExpiresIn=_PRESIGNED_SECONDS,
                Params={"Bucket": self.bucket, "Key": full, "ContentType": content_type},
            )
        problem = await self._send(url, bytes(data), content_type)
        if problem is None:
            return self.uri(key)
        self._fallbacks += 1
        # The URL is a credential: only its outcome is logged, and the first time loudly.
        log.log(logging.WARNING if self._fallbacks == 1 else logging.DEBUG,
                "a presigned upload to s3://%s/%s failed (%s); uploading it through boto3",
                self.bucket, full, problem)
        return await asyncio.to_thread(self.put, key, data, content_type)

    async def _send(self, url: str, data: bytes, content_type: str) -> str | None:
        """PUT `data` to the presigned `url`; None on success, else what went wrong (no URL:
        it is a credential)."""
        import httpx

        from pipeline.httpclient import TRANSPORT_ERRORS, aiohttp_cause

        try:
            request = httpx.Request("PUT", url, content=data,
                                    headers={"Content-Type": content_type})
            response = await self._client_for(url).send(request)  # the body read: none
        # ValueError: a URL aiohttp refuses to send (put_object then says why).
        except (httpx.InvalidURL, ValueError, *TRANSPORT_ERRORS) as exc:  # timeouts too
            return (aiohttp_cause(exc) or exc).__class__.__name__
        return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"

    def _client_for(self, url: str) -> Any:
        """The httpx client of this loop, over an aiohttp pool of `connections`."""
        import aiohttp
        import httpx

        from pipeline.httpclient import client, connector, over_aiohttp

        loop = asyncio.get_running_loop()
        if self._http is None or self._http.is_closed or self._http_loop is not loop:
            # AWS_CA_BUNDLE and the *_PROXY variables as boto3 reads them, once: reading the
            # environment per request would look them (and ~/.netrc) up again every time.
            context = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
            session = aiohttp.ClientSession(connector=connector(self.connections, ssl=context),
                                            proxy=_proxy_for(url))
            self._http = client(over_aiohttp(session, self.connections),
                                connections=self.connections,
                                timeout=httpx.Timeout(connect=30, read=60, write=60, pool=30))
            self._http_loop = loop
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def get(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors("download", full):
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

    def size(self, key: str) -> int | None:
        full = self._full(key)
        try:
            with self._errors("stat", full):
                head = self._client.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            return None
        return int(head["ContentLength"])

    def keys(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        found = []
        with self._errors("list", base + prefix):
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=base + prefix,
                PaginationConfig={"PageSize": self.page_size},
            )
            for page in pages:
                found.extend(obj["Key"][len(base):] for obj in page.get("Contents", ()))
        return sorted(found)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors("delete", full):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def copy(self, source: str, key: str, size: int) -> None:
        """A server-side copy (CopyObject; a multipart copy past S3's 5 GiB limit for one):
        the bytes stay in the bucket, and the object appears whole or not at all."""
        original, full = self._full(source), self._full(key)
        where = {"Bucket": self.bucket, "Key": original}
        with self._errors("copy", original):
            if size < _COPY_OBJECT_MAX:
                self._client.copy_object(Bucket=self.bucket, Key=full, CopySource=where,
                                         MetadataDirective="COPY")
            else:
                self._client.copy(where, self.bucket, full)

    def check(self) -> None:
        with self._errors("check", ""):
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    @contextmanager
    def _errors(self, action: str, full_key: str) -> Iterator[None]:
        """Turn botocore exceptions into StorageError messages a user can act on."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"s3://{self.bucket}/{full_key}"
        try:
            yield
        except ClientError as exc:
            raise _client_error(exc, action, where, self.bucket) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StorageError(
                "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)"
            ) from None
        except EndpointConnectionError:
            raise StorageError(f"cannot reach the S3 endpoint {self._endpoint()}") from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 {action} {where} failed: {_scrub(str(exc))}") from None

    def _endpoint(self) -> str:
        return _redact_url(str(self._client.meta.endpoint_url))


_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "InvalidClientTokenId",
}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _client_error(exc: Any, action: str, where: str, bucket: str) -> StorageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code == "NoSuchBucket":
        return StorageError(f"S3 bucket {bucket!r} does not exist (create it first)")
    if code in _MISSING:
        return ObjectNotFound(f"no object at {where}")
    if code in _DENIED:
        return StorageError(
            f"access denied to {where} ({action}): check the AWS credentials and bucket policy"
        )
    if code in _BAD_CREDENTIALS:
        return StorageError(f"S3 rejected the AWS credentials ({code}) for {action} {where}")
    message = _scrub(str(error.get("Message", "")))
    return StorageError(f"S3 {action} {where} failed: {code or 'error'}: {message}".rstrip(": "))


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url`'s host (HTTPS_PROXY, NO_PROXY...), if any."""
    parts = urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _scrub(text: str) -> str:
    """Remove any AWS secret from the environment that a message might carry."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _redact_url(url: str) -> str:
    """The URL without any user:password@ part."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", url)
