"""pipeline.media.sniff: the fake's real media, handcrafted headers, truncation and garbage."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import struct
import time

import pytest

from fake_upstream.media_bytes import MediaSpec, render
from pipeline.media import MediaInfo, NotMedia, sniff

# kind -> (content type, extension, whether the dimensions are read)
EXPECTED = {
    "png": ("image/png", "png", True),
    "jpeg": ("image/jpeg", "jpg", True),
    "webp": ("image/webp", "webp", True),
    "gif": ("image/gif", "gif", True),
    "mp4": ("video/mp4", "mp4", False),
    "webm": ("video/webm", "webm", False),
    "mp3": ("audio/mpeg", "mp3", False),
    "wav": ("audio/wav", "wav", False),
    "ogg": ("audio/ogg", "ogg", False),
}


def media(kind: str, size: int = 2048, width: int = 1024, height: int = 1024,
          variant: int = 42) -> bytes:
    return render(MediaSpec(kind, size, width, height, variant)).data()


def kind_of(data: bytes) -> tuple[str, str, int | None, int | None]:
    info = sniff(data)
    return info.content_type, info.extension, info.width, info.height


# --- what the fake upstream serves -----------------------------------------------------------

@pytest.mark.parametrize("kind", EXPECTED)
@pytest.mark.parametrize(("size", "width", "height"),
                         [(2048, 1024, 1024), (50_000, 1344, 768), (1, 7, 3)])
def test_generated_media_is_recognised(kind: str, size: int, width: int, height: int) -> None:
    data = media(kind, size, width, height)
    info = sniff(data)
    content_type, extension, has_dims = EXPECTED[kind]
    assert (info.content_type, info.extension) == (content_type, extension)
    assert (info.width, info.height) == ((width, height) if has_dims else (None, None))
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", EXPECTED)
def test_every_prefix_is_media_or_not_media(kind: str) -> None:
    """A cut download never crashes sniff: it is the same type (maybe without dimensions)
    once the magic is in, and NotMedia before."""
    data = media(kind, size=3000, width=640, height=480)
    full = kind_of(data)
    ends = [*range(0, 700), *range(700, len(data), 97)]
    for end in ends:
        try:
            found = kind_of(data[:end])
        except NotMedia:
            assert end < 16, f"{kind} cut at {end} bytes is no longer recognised"
            continue
        if kind == "webm" and end < 32:  # the DocType is not in yet: Matroska, its superset
            assert found[:2] in (("video/x-matroska", "mkv"), full[:2])
            continue
        assert found[:2] == full[:2]
        assert found[2:] in (full[2:], (None, None))


def test_garbage_from_the_fake_is_not_media() -> None:
    with pytest.raises(NotMedia):
        sniff(media("garbage"))


def test_media_info_is_frozen() -> None:
    info = sniff(media("png"))
    assert isinstance(info, MediaInfo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.width = 1  # type: ignore[misc]


def test_bytearray_is_accepted() -> None:
    assert sniff(bytearray(media("gif"))).content_type == "image/gif"


# --- images, handcrafted ---------------------------------------------------------------------

def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def sof(marker: int, width: int, height: int) -> bytes:
    return jpeg_segment(marker, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")


def test_jpeg_frame_size_after_app_segments_and_fill_bytes() -> None:
    data = (b"\xff\xd8" + jpeg_segment(0xE1, b"Exif\x00\x00" + b"\x00" * 3000)
            + b"\xff\xff\xff" + sof(0xC2, 800, 600) + b"\xff\xd9")
    assert kind_of(data) == ("image/jpeg", "jpg", 800, 600)


def test_jpeg_without_frame_header_has_no_dimensions() -> None:
    assert kind_of(b"\xff\xd8\xff\xe0\x00\x10JFIF") == ("image/jpeg", "jpg", None, None)
    # A segment length running past the end, and a scan before any frame header.
    assert kind_of(b"\xff\xd8\xff\xe1\xff\xf0Exif")[2:] == (None, None)
    scan_first = b"\xff\xd8" + jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x00" * 64
    assert kind_of(scan_first)[2:] == (None, None)


def test_jpeg_sof_cut_inside_is_not_a_crash() -> None:
    data = b"\xff\xd8" + sof(0xC0, 640, 480)
    for end in range(3, len(data)):
        assert kind_of(data[:end])[:2] == ("image/jpeg", "jpg")


def test_jpeg_dht_is_not_mistaken_for_a_frame_header() -> None:
    data = b"\xff\xd8" + jpeg_segment(0xC4, b"\x00" * 20) + sof(0xC0, 32, 16)
    assert kind_of(data)[2:] == (32, 16)


def test_jpeg_of_only_fill_bytes_is_quick() -> None:
    started = time.perf_counter()
    assert kind_of(b"\xff\xd8\xff" + b"\xff" * 5_000_000)[2:] == (None, None)
    assert time.perf_counter() - started < 1.0


def test_png_and_gif_headers() -> None:
    assert kind_of(b"\x89PNG\r\n\x1a\n") == ("image/png", "png", None, None)
    assert kind_of(b"GIF87a" + struct.pack("<HH", 320, 200)) == ("image/gif", "gif", 320, 200)
    assert kind_of(b"GIF89a\x05") == ("image/gif", "gif", None, None)


def riff(form: bytes, *chunks: bytes) -> bytes:
    body = form + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def test_webp_lossy_lossless_and_extended() -> None:
    vp8 = b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", 400, 300) + b"\x00" * 8
    assert kind_of(riff(b"WEBP", chunk(b"VP8 ", vp8))) == ("image/webp", "webp", 400, 300)
    bits = (50 - 1) | ((70 - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 4
    assert kind_of(riff(b"WEBP", chunk(b"VP8L", vp8l)))[2:] == (50, 70)
    vp8x = b"\x00" * 4 + (4000 - 1).to_bytes(3, "little") + (3000 - 1).to_bytes(3, "little")
    assert kind_of(riff(b"WEBP", chunk(b"VP8X", vp8x)))[2:] == (4000, 3000)
    assert kind_of(riff(b"WEBP")) == ("image/webp", "webp", None, None)


def box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body) + 8) + kind + body


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    return box(b"ftyp", major + b"\x00\x00\x00\x00" + b"".join(compatible))


def ispe(width: int, height: int) -> bytes:
    return box(b"ispe", b"\x00\x00\x00\x00" + struct.pack(">II", width, height))


def test_avif_dimensions_are_the_largest_image_extent() -> None:
    # A grid: 512x512 tiles and the 2048x1536 primary image, in any order.
    ipco = box(b"ipco", ispe(512, 512) + ispe(2048, 1536) + ispe(512, 512))
    meta = box(b"meta", b"\x00\x00\x00\x00" + box(b"hdlr", b"\x00" * 24) + box(b"iprp", ipco))
    data = ftyp(b"avif", b"mif1", b"avif") + meta + box(b"mdat", b"\x00" * 16)
    assert kind_of(data) == ("image/avif", "avif", 2048, 1536)
    assert kind_of(ftyp(b"mif1", b"mif1", b"avif") + meta)[:2] == ("image/avif", "avif")


def test_heic_and_heif_without_meta_have_no_dimensions() -> None:
    assert kind_of(ftyp(b"heic", b"mif1")) == ("image/heic", "heic", None, None)
    assert kind_of(ftyp(b"mif1", b"mif1"))[:2] == ("image/heif", "heif")


@pytest.mark.parametrize(("major", "expected"), [
    (b"isom", ("video/mp4", "mp4")),
    (b"mp42", ("video/mp4", "mp4")),
    (b"qt  ", ("video/quicktime", "mov")),
    (b"M4A ", ("audio/mp4", "m4a")),
    (b"3gp5", ("video/3gpp", "3gp")),
])
def test_iso_media_brands(major: bytes, expected: tuple[str, str]) -> None:
    assert kind_of(ftyp(major, b"isom") + box(b"moov", b""))[:2] == expected


def test_quicktime_without_ftyp() -> None:
    assert kind_of(box(b"moov", b"\x00" * 16))[:2] == ("video/quicktime", "mov")


def test_iso_box_chain_with_bad_sizes_ends() -> None:
    meta = struct.pack(">I", 1) + b"meta" + struct.pack(">Q", 4)  # largesize below the header
    assert kind_of(ftyp(b"avif") + meta)[2:] == (None, None)
    assert kind_of(ftyp(b"avif") + struct.pack(">I", 0) + b"meta")[2:] == (None, None)


# --- video and audio, handcrafted ------------------------------------------------------------

def ebml_header(doctype: bytes) -> bytes:
    body = b"\x42\x86\x81\x01" + b"\x42\x82" + bytes([0x80 | len(doctype)]) + doctype
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(body)]) + body


def test_matroska_doctypes() -> None:
    assert kind_of(ebml_header(b"webm"))[:2] == ("video/webm", "webm")
    assert kind_of(ebml_header(b"matroska"))[:2] == ("video/x-matroska", "mkv")
    assert kind_of(b"\x1a\x45\xdf\xa3")[:2] == ("video/x-matroska", "mkv")


def ogg_page(packet: bytes) -> bytes:
    return b"OggS\x00\x02" + b"\x00" * 20 + bytes([1, len(packet)]) + packet


def test_ogg_audio_and_video() -> None:
    assert kind_of(ogg_page(b"\x01vorbis" + b"\x00" * 22))[:2] == ("audio/ogg", "ogg")
    assert kind_of(ogg_page(b"\x80theora" + b"\x00" * 34))[:2] == ("video/ogg", "ogv")


def id3(size: int) -> bytes:
    syncsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + syncsafe + b"\x00" * size


def test_mp3_flac_and_aac() -> None:
    frame = b"\xff\xfb\x90\xc4" + b"\x00" * 413
    assert kind_of(id3(30) + frame)[:2] == ("audio/mpeg", "mp3")
    assert kind_of(frame)[:2] == ("audio/mpeg", "mp3")
    assert kind_of(b"\xff\xfd\x90\xc4")[:2] == ("audio/mpeg", "mp2")
    assert kind_of(b"\xff\xf1\x50\x80\x02\x1f\xfc")[:2] == ("audio/aac", "aac")
    assert kind_of(b"fLaC\x00\x00\x00\x22")[:2] == ("audio/flac", "flac")
    assert kind_of(id3(30) + b"fLaC\x00\x00\x00\x22")[:2] == ("audio/flac", "flac")


def test_riff_and_aiff_audio_video() -> None:
    assert kind_of(riff(b"WAVE", chunk(b"fmt ", b"\x00" * 16)))[:2] == ("audio/wav", "wav")
    assert kind_of(riff(b"AVI ", chunk(b"LIST", b"hdrl")))[:2] == ("video/x-msvideo", "avi")
    assert kind_of(b"FORM\x00\x00\x00\x04AIFF")[:2] == ("audio/aiff", "aiff")


# --- not media -------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"",
    b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
    b'{"error": {"message": "expired"}}',
    b"\x00" * 64,
    b"RIFF\x10\x00\x00\x00TEXTjunk",
    b"RIFF",
    b"\xff\xff\xff\xff",  # frame sync with reserved fields
    b"\xff\xd8",  # SOI alone: three bytes make the JPEG magic
    b"ID3\x04\x00\x00\x80\x80\x80\x80",  # size bytes that are not syncsafe
    b"PK\x03\x04zipfile",
])
def test_not_media(data: bytes) -> None:
    with pytest.raises(NotMedia):
        sniff(data)


def test_random_bytes_never_crash() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        blob = rng.randbytes(rng.randrange(0, 64))
        prefix = rng.choice([b"", b"\xff\xd8\xff", b"RIFF", b"\x1a\x45\xdf\xa3", b"OggS",
                             b"ID3\x03", b"\x00\x00\x00\x18ftypavif", b"\x89PNG\r\n\x1a\n"])
        with contextlib.suppress(NotMedia):  # anything else would be a crash
            sniff(prefix + blob)
