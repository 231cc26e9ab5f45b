"""Incremental, bytes-level Server-Sent Events parser (lines end at CR, LF or CRLF only)."""

from __future__ import annotations

from dataclasses import dataclass

_CR = 0x0D
_LF = 0x0A
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Feed raw bytes as they arrive; get the events they complete.

    Each byte is searched once: the bytes kept between feeds are a partial line, which by
    construction holds no line end, so only the new chunk is ever searched (with bytes.find),
    and one huge data line arriving in small chunks costs linear time.
    """

    def __init__(self) -> None:
        self._partial = bytearray()  # the start of a line whose end has not arrived yet
        self._skip_lf = False  # the last chunk ended in CR: an LF first in the next is its pair
        self._at_start = True  # a UTF-8 BOM is allowed once, before the first line
        self._data: list[str] = []
        self._has_data = False
        self._event = ""
        self._id: str | None = None  # the last event id persists across events (the spec)
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if not chunk:
            return events
        pos = 0
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                pos = 1
        size = len(chunk)
        lf = chunk.find(b"\n", pos)
        cr = chunk.find(b"\r", pos)
        while lf >= 0 or cr >= 0:
            end = lf if cr < 0 or 0 <= lf < cr else cr
            event = self._take_line(chunk, pos, end)
            if event is not None:
                events.append(event)
            pos = end + 1
            if end == cr:
                if pos < size and chunk[pos] == _LF:
                    pos += 1
                elif pos == size:
                    self._skip_lf = True
            # Search again only for a marker we have passed; the other one is still ahead.
            if 0 <= lf < pos:
                lf = chunk.find(b"\n", pos)
            if 0 <= cr < pos:
                cr = chunk.find(b"\r", pos)
        if pos < size:
            self._partial += chunk[pos:] if pos else chunk
        return events

    def close(self) -> None:
        """End of stream: an event (or line) not yet ended by a blank line is discarded."""
        self._partial.clear()
        self._skip_lf = False
        self._reset_event()

    def _take_line(self, chunk: bytes, start: int, end: int) -> SSEEvent | None:
        if self._partial:
            self._partial += chunk[start:end]
            line = bytes(self._partial)
            self._partial.clear()
        else:
            line = chunk[start:end]
        if self._at_start:
            self._at_start = False
            if line.startswith(_BOM):
                line = line[len(_BOM):]
        return self._process_line(line)

    def _process_line(self, line: bytes) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        colon = line.find(b":")
        if colon == 0:
            return None  # a comment, such as a keepalive
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            skip = colon + 2 if line[colon + 1:colon + 2] == b" " else colon + 1
            value = line[skip:]
        self._field(name, value)
        return None

    def _field(self, name: bytes, value: bytes) -> None:
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:  # the spec ignores an id holding NUL
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)
        # Any other field name is ignored (the spec).

    def _dispatch(self) -> SSEEvent | None:
        if not self._has_data:
            self._reset_event()
            return None
        event = SSEEvent(
            data="\n".join(self._data),
            event=self._event or "message",
            id=self._id,
            retry=self._retry,
        )
        self._reset_event()
        return event

    def _reset_event(self) -> None:
        self._data = []
        self._has_data = False
        self._event = ""
        self._retry = None
