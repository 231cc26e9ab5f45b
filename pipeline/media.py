"""Recognise media bytes by their magic numbers; read image dimensions from headers only."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["MediaInfo", "NotMedia", "sniff"]


class NotMedia(ValueError):
    """The bytes are no media type we recognise (the reason says why)."""


@dataclass(frozen=True)
class MediaInfo:
    """What a blob of upstream bytes is. Dimensions are None for audio/video or unreadable."""

    content_type: str
    extension: str  # without the dot: "png", "jpg", "mp4"...
    width: int | None
    height: int | None
    sha256: str
    size: int


# (content_type, extension, width, height), or None when a detector does not recognise the bytes.
_Kind = tuple[str, str, int | None, int | None]
_Detector = Callable[[bytes], _Kind | None]

# Bounds on header walks, so crafted input (thousands of tiny segments or boxes) stays cheap.
_MAX_STEPS = 4096


def sniff(data: bytes) -> MediaInfo:
    """Identify `data` by its leading bytes; raise NotMedia when it is no media we know."""
    if not data:
        raise NotMedia("empty body")
    kind = _detect(bytes(data))
    if kind is None:
        raise NotMedia(f"unrecognised leading bytes {bytes(data[:8]).hex()}")
    content_type, extension, width, height = kind
    digest = hashlib.sha256(data).hexdigest()
    return MediaInfo(content_type, extension, width, height, digest, len(data))


def _detect(data: bytes) -> _Kind | None:
    for detector in _DETECTORS:
        try:
            kind = detector(data)
        except (IndexError, struct.error, ValueError) as exc:
            # A header parser bug on crafted bytes must not crash a render: call it not media.
            raise NotMedia(f"malformed header ({exc.__class__.__name__})") from None
        if kind is not None:
            return kind
    return None


# --- little helpers --------------------------------------------------------------------------

def _be16(data: bytes, pos: int) -> int | None:
    return struct.unpack_from(">H", data, pos)[0] if pos + 2 <= len(data) else None


def _be32(data: bytes, pos: int) -> int | None:
    return struct.unpack_from(">I", data, pos)[0] if pos + 4 <= len(data) else None


def _dims(width: int | None, height: int | None) -> tuple[int | None, int | None]:
    """Both dimensions or neither: a zero or missing side means we could not read them."""
    if not width or not height:
        return None, None
    return width, height


# --- images ----------------------------------------------------------------------------------

def _png(data: bytes) -> _Kind | None:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    # IHDR must be the first chunk; a truncated one leaves the dimensions unknown.
    if data[12:16] != b"IHDR":
        return ("image/png", "png", None, None)
    return ("image/png", "png", *_dims(_be32(data, 16), _be32(data, 20)))


# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers with no length field after them.
_JPEG_STANDALONE = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])


def _jpeg(data: bytes) -> _Kind | None:
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    return ("image/jpeg", "jpg", *_jpeg_frame_size(data))


def _jpeg_frame_size(data: bytes) -> tuple[int | None, int | None]:
    """Walk marker segments (never the entropy-coded data) up to the first SOF."""
    pos = 2
    for _ in range(_MAX_STEPS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF or marker in _JPEG_STANDALONE:
            pos += 1 if marker == 0xFF else 2  # fill byte, or a marker with no payload
            continue
        if marker in (0xD9, 0xDA):  # image ended or scan began before any frame header
            break
        if marker in _JPEG_SOF:
            return _dims(_be16(data, pos + 7), _be16(data, pos + 5))
        pos += 2 + (_be16(data, pos + 2) or 0)
    return None, None


def _gif(data: bytes) -> _Kind | None:
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        return None
    if len(data) < 10:
        return ("image/gif", "gif", None, None)
    width, height = struct.unpack_from("<HH", data, 6)
    return ("image/gif", "gif", *_dims(width, height))


def _riff(data: bytes) -> _Kind | None:
    if data[:4] != b"RIFF":
        return None
    form = data[8:12]
    if form == b"WEBP":
        return ("image/webp", "webp", *_webp_size(data))
    if form == b"WAVE":
        return ("audio/wav", "wav", None, None)
    if form == b"AVI ":
        return ("video/x-msvideo", "avi", None, None)
    return None


def _webp_size(data: bytes) -> tuple[int | None, int | None]:
    """Canvas size from the first chunk: VP8X (extended), VP8L (lossless) or VP8 (lossy)."""
    chunk, body = data[12:16], 20
    if chunk == b"VP8X" and len(data) >= body + 10:
        width = int.from_bytes(data[body + 4:body + 7], "little") + 1
        height = int.from_bytes(data[body + 7:body + 10], "little") + 1
        return width, height
    if chunk == b"VP8L" and len(data) >= body + 5 and data[body] == 0x2F:
        bits = int.from_bytes(data[body + 1:body + 5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= body + 10 and data[body + 3:body + 6] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, body + 6)
        return _dims(width & 0x3FFF, height & 0x3FFF)
    return None, None


# --- ISO base media (MP4, MOV, M4A, AVIF, HEIC) ------------------------------------------------

_AVIF_BRANDS = frozenset([b"avif", b"avis"])
_HEIC_BRANDS = frozenset([b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"])
_AUDIO_BRANDS = frozenset([b"M4A ", b"M4B ", b"M4P "])


def _iso_bmff(data: bytes) -> _Kind | None:
    if data[4:8] == b"ftyp":
        return _by_brand(data)
    # QuickTime files older than the ftyp box start straight with one of these atoms.
    if data[4:8] in (b"moov", b"mdat", b"wide") and (_be32(data, 0) or 0) >= 8:
        return ("video/quicktime", "mov", None, None)
    return None


def _by_brand(data: bytes) -> _Kind | None:
    size = _be32(data, 0) or 0
    major = data[8:12]
    brands = {major, *(data[i:i + 4] for i in range(16, min(size, len(data), 256) - 3, 4))}
    if major in _AVIF_BRANDS or (major in (b"mif1", b"msf1") and brands & _AVIF_BRANDS):
        return ("image/avif", "avif", *_ispe_size(data))
    if major in _HEIC_BRANDS or (major in (b"mif1", b"msf1") and brands & _HEIC_BRANDS):
        return ("image/heic", "heic", *_ispe_size(data))
    if major in (b"mif1", b"msf1"):
        return ("image/heif", "heif", *_ispe_size(data))
    if major == b"qt  ":
        return ("video/quicktime", "mov", None, None)
    if major in _AUDIO_BRANDS:
        return ("audio/mp4", "m4a", None, None)
    if major.startswith(b"3g2"):
        return ("video/3gpp2", "3g2", None, None)
    if major.startswith(b"3gp"):
        return ("video/3gpp", "3gp", None, None)
    return ("video/mp4", "mp4", None, None)


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each box in data[start:end]."""
    pos = start
    for _ in range(_MAX_STEPS):
        if pos + 8 > end:
            return
        size, kind, header = _be32(data, pos) or 0, data[pos + 4:pos + 8], 8
        if size == 1 and pos + 16 <= end:  # 64-bit "largesize" follows the type
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:  # box runs to the end of its parent
            size = end - pos
        if size < header:
            return
        yield kind, pos + header, min(pos + size, end)
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def _ispe_size(data: bytes) -> tuple[int | None, int | None]:
    """Largest `ispe` (image spatial extent) under meta/iprp/ipco.

    The primary item is the largest: tiles of a grid and thumbnails are smaller, so this avoids
    resolving item associations (ipma/pitm) for the same answer.
    """
    span: tuple[int, int] | None = (0, len(data))
    for kind, skip in ((b"meta", 4), (b"iprp", 0), (b"ipco", 0)):  # meta is a FullBox
        span = _child(data, span[0], span[1], kind)
        if span is None:
            return None, None
        span = (span[0] + skip, span[1])
    best = (0, 0)
    for kind, start, end in _boxes(data, *span):
        if kind == b"ispe" and end - start >= 12:
            width, height = struct.unpack_from(">II", data, start + 4)
            best = max(best, (width, height), key=lambda wh: wh[0] * wh[1])
    return _dims(*best)


# --- Matroska / WebM -------------------------------------------------------------------------

def _ebml(data: bytes) -> _Kind | None:
    if not data.startswith(b"\x1a\x45\xdf\xa3"):
        return None
    doctype = _ebml_doctype(data)
    if doctype == b"webm":
        return ("video/webm", "webm", None, None)
    return ("video/x-matroska", "mkv", None, None)


def _vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int] | None:
    """An EBML variable-length integer at pos: (value, length), or None if cut or invalid."""
    if pos >= len(data) or data[pos] == 0:
        return None
    length = 9 - data[pos].bit_length()
    if pos + length > len(data):
        return None
    value = int.from_bytes(data[pos:pos + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
    return value, length


def _ebml_doctype(data: bytes) -> bytes | None:
    size = _vint(data, 4, keep_marker=False)
    if size is None:
        return None
    pos, end = 4 + size[1], min(len(data), 4 + size[1] + size[0])
    for _ in range(_MAX_STEPS):
        element = _vint(data, pos, keep_marker=True)
        if element is None:
            return None
        size = _vint(data, pos + element[1], keep_marker=False)
        if size is None:
            return None
        start = pos + element[1] + size[1]
        if element[0] == 0x4282:
            return data[start:start + size[0]].rstrip(b"\x00")
        pos = start + size[0]
        if pos >= end:
            return None
    return None


# --- audio -----------------------------------------------------------------------------------

def _ogg(data: bytes) -> _Kind | None:
    if not data.startswith(b"OggS"):
        return None
    segments = data[26] if len(data) > 26 else 0
    first_packet = data[27 + segments:27 + segments + 8]
    if first_packet.startswith(b"\x80theora"):
        return ("video/ogg", "ogv", None, None)
    return ("audio/ogg", "ogg", None, None)


def _flac(data: bytes) -> _Kind | None:
    return ("audio/flac", "flac", None, None) if data.startswith(b"fLaC") else None


def _aiff(data: bytes) -> _Kind | None:
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return ("audio/aiff", "aiff", None, None)
    return None


def _id3(data: bytes) -> _Kind | None:
    """An ID3v2 tag, then usually MPEG audio (some FLAC files carry one too)."""
    if not data.startswith(b"ID3") or len(data) < 10 or data[3] not in (2, 3, 4):
        return None
    syncsafe = data[6:10]
    if any(byte & 0x80 for byte in syncsafe):
        return None
    size = 10 + sum(byte << (7 * (3 - i)) for i, byte in enumerate(syncsafe))
    size += 10 if data[5] & 0x10 else 0  # a footer repeats the header
    if data[size:size + 4] == b"fLaC":
        return ("audio/flac", "flac", None, None)
    return ("audio/mpeg", "mp3", None, None)


def _mpeg_audio(data: bytes) -> _Kind | None:
    """A bare MPEG audio frame header (11 sync bits), or an AAC ADTS header."""
    if len(data) < 4 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return None
    if data[1] & 0xF6 == 0xF0:  # ADTS: MPEG-4/2 AAC, layer bits 00
        return ("audio/aac", "aac", None, None)
    version, layer = (data[1] >> 3) & 3, (data[1] >> 1) & 3
    bitrate, rate = data[2] >> 4, (data[2] >> 2) & 3
    if version == 1 or layer == 0 or bitrate == 0xF or rate == 3:  # reserved values
        return None
    return ("audio/mpeg", "mp3" if layer == 1 else "mp2", None, None)


# Order matters only for the loose frame-sync check, which goes last.
_DETECTORS: tuple[_Detector, ...] = (
    _png, _jpeg, _gif, _riff, _iso_bmff, _ebml, _ogg, _flac, _aiff, _id3, _mpeg_audio,
)
