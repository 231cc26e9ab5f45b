"""Real media files for the fake upstream: valid headers, any size, cheap to serve.

Each file is a small `head` that depends on the variant (colours, a tag) and a large `tail`
shared by every variant of the same kind, size and dimensions. Tails (and their base64) are
cached, so a request costs a few hundred bytes of work however big the file is: the fake must
serve hundreds of concurrent renders on two cores without stealing the client's CPU.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

KINDS: dict[str, tuple[str, str]] = {  # kind -> (content type, extension)
    "png": ("image/png", "png"),
    "jpeg": ("image/jpeg", "jpg"),
    "webp": ("image/webp", "webp"),
    "gif": ("image/gif", "gif"),
    "mp4": ("video/mp4", "mp4"),
    "webm": ("video/webm", "webm"),
    "mp3": ("audio/mpeg", "mp3"),
    "wav": ("audio/wav", "wav"),
    "ogg": ("audio/ogg", "ogg"),
    # Not media at all: what a broken provider or CDN error page hands back.
    "garbage": ("image/png", "png"),
}
MAX_SIDE = 8192


@dataclass(frozen=True)
class MediaSpec:
    kind: str
    size: int  # wanted total bytes; the result is within a few hundred bytes of it
    width: int
    height: int
    variant: int  # 64 bits from prompt + seed: picks colours and tags


@dataclass(frozen=True)
class Media:
    head: bytes
    tail: bytes
    tail_key: tuple[str, int, int, int]

    def data(self) -> bytes:
        return self.head + self.tail

    def b64_parts(self) -> tuple[bytes, bytes]:
        """Base64 of data() in two pieces; only the head is encoded here, the tail's is cached.

        Pieces, not one string: at a megabyte per image every copy shows in the fake's CPU.
        """
        cut = -len(self.head) % 3  # head + cut bytes of tail is a whole number of 3-byte groups
        return base64.b64encode(self.head + self.tail[:cut]), _tail_b64(self.tail_key, cut)


def variant_of(prompt: str, seed: int) -> int:
    """Same prompt + same seed gives the same variant, hence the same bytes."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def render(spec: MediaSpec) -> Media:
    key = _tail_key(spec)
    tail = _tail(*key)
    head_of, _ = _BUILDERS[spec.kind]
    width, height = _side(spec.width), _side(spec.height)
    return Media(head_of(replace(spec, width=width, height=height), len(tail)), tail, key)


def _side(value: int) -> int:
    return min(max(value, 1), MAX_SIDE)


def _tail_key(spec: MediaSpec) -> tuple[str, int, int, int]:
    if spec.kind not in KINDS:
        raise ValueError(f"unknown media kind {spec.kind!r}")
    width, height = _side(spec.width), _side(spec.height)
    if spec.kind in ("mp3", "wav", "ogg", "garbage"):
        width = height = 1  # dimensions do not reach these bytes: share one cache entry
    return spec.kind, max(spec.size, 0), width, height


# Files above this are rare (size-cap tests) and would pin a lot of memory in the caches.
_CACHE_MAX_BYTES = 8 * 1024 * 1024


def _tail(kind: str, size: int, width: int, height: int) -> bytes:
    if size > _CACHE_MAX_BYTES:
        return _build_tail(kind, size, width, height)
    return _cached_tail(kind, size, width, height)


def _build_tail(kind: str, size: int, width: int, height: int) -> bytes:
    head_of, tail_of = _BUILDERS[kind]
    # Head lengths do not depend on the variant or the tail, so variant 0 measures them.
    head_len = len(head_of(MediaSpec(kind, size, width, height, 0), 0))
    return tail_of(max(size - head_len, 0), width, height)


_cached_tail = lru_cache(maxsize=32)(_build_tail)


def _tail_b64(key: tuple[str, int, int, int], cut: int) -> bytes:
    if key[1] > _CACHE_MAX_BYTES:
        return base64.b64encode(_tail(*key)[cut:])
    return _cached_tail_b64(key, cut)


@lru_cache(maxsize=32)
def _cached_tail_b64(key: tuple[str, int, int, int], cut: int) -> bytes:
    return base64.b64encode(_tail(*key)[cut:])


def _rgb(variant: int, slot: int) -> bytes:
    return ((variant >> (24 * slot)) & 0xFFFFFF).to_bytes(3, "big")


class _Bits:
    """Bit packer. LSB-first for GIF and VP8L; MSB-first (JPEG) packs by hand below."""

    def __init__(self) -> None:
        self.value = 0
        self.count = 0

    def put(self, value: int, width: int) -> None:
        self.value |= value << self.count
        self.count += width

    def to_bytes(self) -> bytes:
        return self.value.to_bytes((self.count + 7) // 8, "little")


# --- PNG: 1-bit palette image, so colours live in PLTE and the pixels never change ------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body)
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _png_head(spec: MediaSpec, tail_len: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", spec.width, spec.height, 1, 3, 0, 0, 0)
    palette = _rgb(spec.variant, 0) + _rgb(spec.variant, 1)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"PLTE", palette)


def _png_tail(budget: int, width: int, height: int) -> bytes:
    idat = _png_chunk(b"IDAT", zlib.compress(_checkerboard(width, height), 9))
    iend = _png_chunk(b"IEND", b"")
    pad = budget - len(idat) - len(iend)
    text = _png_chunk(b"tEXt", b"Comment\x00" + b" " * (pad - 20)) if pad >= 20 else b""
    return idat + text + iend


def _checkerboard(width: int, height: int) -> bytes:
    """Filter-0 scanlines of a 32-pixel checkerboard in palette entries 0 and 1."""
    row_len = (width + 7) // 8
    even = (b"\x00" * 4 + b"\xff" * 4) * (row_len // 8 + 1)
    odd = bytes(255 - b for b in even[:8]) * (row_len // 8 + 1)
    rows = [b"\x00" + even[:row_len], b"\x00" + odd[:row_len]]
    bands = [rows[(y // 32) % 2] * min(32, height - y) for y in range(0, height, 32)]
    return b"".join(bands)


# --- JPEG: baseline 4:2:0 with flat blocks; the colour is the DC quantiser step ---------------

def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def _jpeg_head(spec: MediaSpec, tail_len: int) -> bytes:
    jfif = _jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    tables = b""
    for table in range(3):  # one table per component; AC steps are unused (all AC are zero)
        step = 1 + (spec.variant >> (8 * table)) % 127
        tables += bytes([table, step]) + b"\x01" * 63
    return b"\xff\xd8" + jfif + _jpeg_segment(0xDB, tables)


# Huffman tables: DC category 0 is the 1-bit code "0", categories 1..11 are 5-bit codes 10000..;
# the only AC symbol is EOB, code "0". Every block after the first is then the bits "00".
_DC_COUNTS = bytes([1, 0, 0, 0, 11] + [0] * 11)
_DC_SYMBOLS = bytes(range(12))
_AC_COUNTS = bytes([1] + [0] * 15)
# First-block DC values per component (Y, Cb, Cr): pixel = 128 + value * step / 8.
_FIRST_DC = (8, -4, 4)


def _jpeg_tail(budget: int, width: int, height: int) -> bytes:
    sof = struct.pack(">BHHB", 8, height, width, 3) + bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 2])
    dht = b"\x00" + _DC_COUNTS + _DC_SYMBOLS + b"\x10" + _AC_COUNTS + b"\x00"
    sos = bytes([3, 1, 0x00, 2, 0x00, 3, 0x00, 0, 63, 0])
    body = (_jpeg_segment(0xC0, sof) + _jpeg_segment(0xC4, dht) + _jpeg_segment(0xDA, sos)
            + _jpeg_scan(width, height) + b"\xff\xd9")
    return _jpeg_comments(budget - len(body)) + body


def _dc_bits(value: int) -> str:
    category = abs(value).bit_length()
    if category == 0:
        return "0"
    code = format(16 + category - 1, "05b")
    return code + format(value if value > 0 else value + (1 << category) - 1, f"0{category}b")


def _jpeg_scan(width: int, height: int) -> bytes:
    y, cb, cr = _FIRST_DC
    first = _dc_bits(y) + "0" + "00" * 3 + _dc_bits(cb) + "0" + _dc_bits(cr) + "0"
    mcus = ((width + 15) // 16) * ((height + 15) // 16)
    total = len(first) + 12 * (mcus - 1)  # 6 blocks of "00" per later MCU
    pad = -total % 8  # the scan ends on a byte boundary, padded with 1 bits
    value = (int(first, 2) << (total - len(first) + pad)) | ((1 << pad) - 1)
    return value.to_bytes((total + pad) // 8, "big").replace(b"\xff", b"\xff\x00")


def _jpeg_comments(budget: int) -> bytes:
    out = []
    while budget >= 5:
        take = min(budget, 65537)  # a COM segment holds at most 65533 bytes of text
        if 0 < budget - take < 5:
            take -= 5
        out.append(_jpeg_segment(0xFE, b" " * (take - 4)))
        budget -= take
    return b"".join(out)


# --- WebP: lossless, every prefix code has one symbol, so pixels take zero bits ----------------

def _riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def _webp_head(spec: MediaSpec, tail_len: int) -> bytes:
    canvas = (spec.width - 1).to_bytes(3, "little") + (spec.height - 1).to_bytes(3, "little")
    vp8x = b"\x00\x00\x00\x00" + canvas  # no alpha, ICC, EXIF, XMP or animation
    chunks = _riff_chunk(b"VP8X", vp8x) + _riff_chunk(b"VP8L", _vp8l(spec))
    return b"RIFF" + struct.pack("<I", 4 + len(chunks) + tail_len) + b"WEBP" + chunks


def _vp8l(spec: MediaSpec) -> bytes:
    bits = _Bits()
    for value, width in ((0x2F, 8), (spec.width - 1, 14), (spec.height - 1, 14), (0, 1), (0, 3)):
        bits.put(value, width)  # signature, size, alpha_is_used, version
    for _ in range(3):  # no transform, no colour cache, no meta prefix codes
        bits.put(0, 1)
    red, green, blue = _rgb(spec.variant, 0)
    for symbol in (green, red, blue, 255, 0):  # green, red, blue, alpha, distance
        bits.put(1, 1)  # simple code
        bits.put(0, 1)  # with one symbol
        bits.put(1, 1)  # of 8 bits
        bits.put(symbol, 8)
    return bits.to_bytes()


def _webp_tail(budget: int, width: int, height: int) -> bytes:
    # An unknown chunk at the end of an extended (VP8X) file; readers skip it.
    return _riff_chunk(b"PAD ", b"\x00" * ((budget - 8) & ~1)) if budget >= 8 else b""


# --- GIF: one solid frame in colour 0; colours come from the global colour table ----------------

def _gif_head(spec: MediaSpec, tail_len: int) -> bytes:
    screen = struct.pack("<HHBBB", spec.width, spec.height, 0x91, 0, 0)  # 4-colour global table
    colours = _rgb(spec.variant, 0) + _rgb(spec.variant, 1) + b"\x00\x00\x00\xff\xff\xff"
    return b"GIF89a" + screen + colours


def _sub_blocks(data: bytes) -> bytes:
    blocks = [bytes([len(part)]) + part for part in
              (data[i:i + 255] for i in range(0, len(data), 255))]
    return b"".join(blocks) + b"\x00"


def _gif_tail(budget: int, width: int, height: int) -> bytes:
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    image += b"\x02" + _sub_blocks(_lzw_solid(width * height)) + b"\x3b"
    room = budget - len(image) - 3  # comment extension: 21 FE, blocks, 00
    comment = b"\x21\xfe" + _sub_blocks(b" " * (room * 255 // 256)) if room > 2 else b""
    return comment + image


def _lzw_solid(pixels: int) -> bytes:
    """LZW codes for `pixels` copies of colour 0, minimum code size 2, without a dictionary.

    In a run of one colour each code stands for one pixel more than the last (1, 2, 3...), and
    code width follows the decoder: it grows when the next free code reaches 1 << width.
    """
    clear, end = 4, 5
    bits, width = _Bits(), 3
    bits.put(clear, width)
    left, run, next_code = pixels, 1, 6
    while left > 0:
        take = min(run, left)
        bits.put(0 if take == 1 else take + 4, width)  # a run of L >= 2 is code 6 + (L - 2)
        left -= take
        if run > 1:  # the decoder adds an entry for every code but the first after a clear
            next_code += 1
            if next_code == 1 << width and width < 12:
                width += 1
        run += 1
        if next_code >= 4094 and left > 0:  # table nearly full: start again
            bits.put(clear, width)
            width, run, next_code = 3, 1, 6
    bits.put(end, width)
    return bits.to_bytes()


# --- MP4: ftyp + moov/mvhd + mdat; the variant is the first bytes of mdat --------------------

def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body) + 8) + kind + body


_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def _mp4_head(spec: MediaSpec, tail_len: int) -> bytes:
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41")
    mvhd = (struct.pack(">5I", 0, 0, 0, 1000, 1000) + struct.pack(">IH", 0x10000, 0x100)
            + bytes(10) + _MATRIX + bytes(24) + struct.pack(">I", 1))
    mdat = struct.pack(">I", 16 + tail_len) + b"mdat" + spec.variant.to_bytes(8, "big")
    return ftyp + _box(b"moov", _box(b"mvhd", mvhd)) + mdat


def _zeros_tail(budget: int, width: int, height: int) -> bytes:
    return bytes(budget)


# --- WebM: EBML header, Segment with Info and one VP9 track, then a Void element ------------

def _element(element_id: int, body: bytes) -> bytes:
    id_bytes = element_id.to_bytes((element_id.bit_length() + 7) // 8, "big")
    size = bytes([0x80 | len(body)]) if len(body) < 127 else b"\x01" + len(body).to_bytes(7, "big")
    return id_bytes + size + body


def _webm_head(spec: MediaSpec, tail_len: int) -> bytes:
    ebml = _element(0x1A45DFA3, b"".join([
        _element(0x4286, b"\x01"), _element(0x42F7, b"\x01"), _element(0x42F2, b"\x04"),
        _element(0x42F3, b"\x08"), _element(0x4282, b"webm"), _element(0x4287, b"\x04"),
        _element(0x4285, b"\x02"),
    ]))
    info = _element(0x1549A966, _element(0x2AD7B1, (1_000_000).to_bytes(3, "big"))
                    + _element(0x4D80, b"fake_upstream") + _element(0x5741, b"fake_upstream"))
    video = _element(0xE0, _element(0xB0, spec.width.to_bytes(2, "big"))
                     + _element(0xBA, spec.height.to_bytes(2, "big")))
    track = _element(0xAE, _element(0xD7, b"\x01")
                     + _element(0x73C5, (spec.variant | 1).to_bytes(8, "big"))
                     + _element(0x83, b"\x01") + _element(0x86, b"V_VP9") + video)
    void_header = b"\xec\x01" + tail_len.to_bytes(7, "big")
    body = info + _element(0x1654AE6B, track) + void_header
    segment = b"\x18\x53\x80\x67\x01" + (len(body) + tail_len).to_bytes(7, "big")
    return ebml + segment + body


# --- MP3: ID3v2.3 tag (title from the variant, padding), then silent MPEG-1 layer III frames ----

_MP3_FRAME = b"\xff\xfb\x90\xc4" + bytes(413)  # 128 kbit/s, 44.1 kHz, mono: 417 bytes


def _mp3_head(spec: MediaSpec, tail_len: int) -> bytes:
    title = b"\x00fake " + f"{spec.variant:016x}".encode()
    frame = b"TIT2" + struct.pack(">IH", len(title), 0) + title
    padding = tail_len % len(_MP3_FRAME)  # the tag's zero padding opens the tail
    size = len(frame) + padding
    syncsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x03\x00\x00" + syncsafe + frame


def _mp3_tail(budget: int, width: int, height: int) -> bytes:
    frames = max(budget // len(_MP3_FRAME), 1)
    return bytes(max(budget - frames * len(_MP3_FRAME), 0)) + _MP3_FRAME * frames


# --- WAV: 8 kHz 8-bit mono square wave; the variant sits in a LIST/INFO title ----------------

def _wav_head(spec: MediaSpec, tail_len: int) -> bytes:
    fmt = _riff_chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 8000, 8000, 1, 8))
    title = _riff_chunk(b"INAM", b"fake " + f"{spec.variant:016x}".encode() + b"\x00")
    info = _riff_chunk(b"LIST", b"INFO" + title)
    data_header = b"data" + struct.pack("<I", tail_len)
    body = b"WAVE" + fmt + info + data_header
    return b"RIFF" + struct.pack("<I", len(body) + tail_len) + body


def _wav_tail(budget: int, width: int, height: int) -> bytes:
    period = b"\xa0" * 9 + b"\x60" * 9  # about 444 Hz at 8 kHz
    samples = budget & ~1  # RIFF chunks are even-sized
    return (period * (samples // len(period) + 1))[:samples]


# --- OGG: Opus head and tags pages (variant in a tag), then pages of silent CELT frames ---------

_OGG_SERIAL = 0x46414B45


def _ogg_crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_OGG_TABLE = _ogg_crc_table()


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_TABLE[(crc >> 24) ^ byte]
    return crc


def _ogg_page(packets: list[bytes], flags: int, granule: int, sequence: int) -> bytes:
    lacing = b"".join(b"\xff" * (len(p) // 255) + bytes([len(p) % 255]) for p in packets)
    header = (b"OggS\x00" + bytes([flags]) + struct.pack("<qII", granule, _OGG_SERIAL, sequence)
              + b"\x00\x00\x00\x00" + bytes([len(lacing)]) + lacing)
    page = header + b"".join(packets)
    return page[:22] + struct.pack("<I", _ogg_crc(page)) + page[26:]


def _ogg_head(spec: MediaSpec, tail_len: int) -> bytes:
    opus_head = b"OpusHead\x01\x01" + struct.pack("<HIhB", 312, 48000, 0, 0)
    comment = b"TITLE=fake " + f"{spec.variant:016x}".encode()
    tags = (b"OpusTags" + struct.pack("<I", 13) + b"fake_upstream" + struct.pack("<I", 1)
            + struct.pack("<I", len(comment)) + comment)
    return _ogg_page([opus_head], 0x02, 0, 0) + _ogg_page([tags], 0x00, 0, 1)


_OPUS_PACKET = b"\xf8" + bytes(999)  # CELT fullband 20 ms mono, one frame
_PACKETS_PER_PAGE = 63  # each packet needs 4 lacing values; a page holds 255


def _ogg_tail(budget: int, width: int, height: int) -> bytes:
    count = max(round(budget / (len(_OPUS_PACKET) + 4.5)), 1)
    pages, sequence, granule = [], 2, 0
    for start in range(0, count, _PACKETS_PER_PAGE):
        packets = [_OPUS_PACKET] * min(_PACKETS_PER_PAGE, count - start)
        granule += 960 * len(packets)
        last = start + _PACKETS_PER_PAGE >= count
        pages.append(_ogg_page(packets, 0x04 if last else 0x00, granule, sequence))
        sequence += 1
    return b"".join(pages)


# --- garbage: an HTML error page served where media was promised -----------------------------

def _garbage_head(spec: MediaSpec, tail_len: int) -> bytes:
    return f"<!DOCTYPE html><html><body>upstream error {spec.variant:016x}</body></html>\n".encode()


def _garbage_tail(budget: int, width: int, height: int) -> bytes:
    return b" " * budget


_Head = Callable[[MediaSpec, int], bytes]
_TailOf = Callable[[int, int, int], bytes]
_BUILDERS: dict[str, tuple[_Head, _TailOf]] = {
    "png": (_png_head, _png_tail),
    "jpeg": (_jpeg_head, _jpeg_tail),
    "webp": (_webp_head, _webp_tail),
    "gif": (_gif_head, _gif_tail),
    "mp4": (_mp4_head, _zeros_tail),
    "webm": (_webm_head, _zeros_tail),
    "mp3": (_mp3_head, _mp3_tail),
    "wav": (_wav_head, _wav_tail),
    "ogg": (_ogg_head, _ogg_tail),
    "garbage": (_garbage_head, _garbage_tail),
}
