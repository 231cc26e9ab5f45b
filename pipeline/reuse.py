"""Seeded reuse: a render whose request already succeeded is copied, not sent again.

Same prompt + same seed = same image, so a seeded request (model, prompt, seed, n and every
other key sent upstream; never custom_id or metadata, which are not sent) that succeeded
once, in any job of this database, is not paid for again: its files are copied under the new
render's keys (S3 server-side, a hard link on files), and the render settles at 0 cents with
a `reused` ledger row whose `images x price_per_image_cents` is what the original paid.
A request without a seed is never reused: the same prompt unseeded is meant to come out
different. A job submitted with `--no-reuse` (jobs.reuse False) always calls.

The key is 64 bits of the SHA-256 of the request's canonical JSON (`request_key`), on the
render as `request_key` (BIGINT) with a partial index over the renders that succeeded with
one; only renders that called the upstream get a key, so a lookup finds originals, never
copies. A candidate is taken only once its own request, rebuilt from its item, is equal to
ours: a 64-bit collision costs a second candidate, never a wrong image.

Only renders that succeeded are copied: their files were all stored before that status was
committed (an image row is written once its bytes are stored), so a copy never reads a
half-written file. Two jobs rendering the same request at once both call (and pay).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from pipeline import queries
from pipeline.plan import RenderSpec, render_request
from pipeline.storage import MediaStore, StorageError, media_key

# Candidates read per lookup: more than one only after a collision of 64-bit keys, or when
# the same request was rendered several times (--no-reuse, or two jobs at once).
CANDIDATES = 4


def canonical(request: Mapping[str, Any]) -> bytes:
    """The request as the client sends it (`sse: true` added), as JSON with sorted keys and no
    spaces: equal requests give equal bytes, whatever their keys' order in the job file."""
    return json.dumps({**request, "sse": True}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode("ascii")


def request_key(request: Mapping[str, Any]) -> int | None:
    """A signed 64-bit digest of the request sent upstream; None without a seed (such a
    request is never reused)."""
    if request.get("seed") is None:
        return None
    digest = hashlib.sha256(canonical(request)).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class SourceFile:
    """One stored file of the original render, as its image row describes it."""

    index: int
    key: str
    content_type: str
    size: int
    sha256: str
    width: int | None
    height: int | None
    seed: int | None
    revised_prompt: str | None

    @property
    def extension(self) -> str:
        return self.key.rpartition(".")[2]


@dataclass(frozen=True)
class Source:
    """A render that succeeded with the same request: its files, and the price per image its
    job paid for them (what a copy saves)."""

    render_id: int
    job_id: int
    price_per_image_cents: int
    files: tuple[SourceFile, ...]


def find_source(db: Connection, key: int, request: Mapping[str, Any], render_id: int
                ) -> Source | None:
    """The latest render (not `render_id`) that succeeded with exactly this request and still
    has all its files recorded, or None."""
    wanted = canonical(request)
    for candidate in queries.reuse_candidates(db, key, render_id, CANDIDATES):
        spec = RenderSpec(candidate.render_index, candidate.n, candidate.seed)
        try:
            theirs = canonical(render_request(json.loads(candidate.body), spec))
        except (ValueError, TypeError):
            continue
        if theirs != wanted:
            continue  # another request whose key collides with ours
        files = tuple(SourceFile(row.image_index, row.key, row.content_type, row.bytes,
                                 row.sha256, row.width, row.height, row.seed,
                                 row.revised_prompt)
                      for row in queries.images_of_render(db, candidate.id))
        if len(files) == candidate.n:
            return Source(candidate.id, candidate.job_id, candidate.price_per_image_cents,
                          files)
    return None


@dataclass(frozen=True)
class Copied:
    """What a copy left: the keys stored (in the source's order), and why it stopped, if it
    did (then the render calls the upstream after all)."""

    keys: tuple[str, ...]
    problem: str | None = None


def copy_files(store: MediaStore, source: Source, *, job_id: int, line: int,
               custom_id: str | None, render_index: int, attempt: int) -> Copied:
    """Each of the source's files copied under this render's own deterministic key (blocking:
    run it on a thread)."""
    stored: list[str] = []
    for file in source.files:
        key = media_key(job_id, line, custom_id, render_index, file.index, file.extension,
                        attempt=attempt)
        try:
            store.copy(file.key, key, file.size)
        except StorageError as exc:
            return Copied(tuple(stored), f"copying the files of render {source.render_id} "
                                         f"failed: {exc}")
        stored.append(key)
    return Copied(tuple(stored))
