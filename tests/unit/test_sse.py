"""The SSE parser on its own: every line-ending and field rule, chunk splits, and linear time."""

from __future__ import annotations

import time

import pytest

from pipeline.sse import SSEEvent, SSEParser


def parse(*chunks: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    parser.close()
    return events


def parse_bytewise(stream: bytes) -> list[SSEEvent]:
    return parse(*(stream[i:i + 1] for i in range(len(stream))))


def datas(events: list[SSEEvent]) -> list[str]:
    return [event.data for event in events]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_each_line_end(eol: bytes) -> None:
    stream = b"data: one" + eol + eol + b"data: two" + eol + eol
    assert datas(parse(stream)) == ["one", "two"]
    assert datas(parse_bytewise(stream)) == ["one", "two"]


def test_mixed_line_ends_in_one_stream() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\rdata: c\n\ndata: d\r\n\n"
    assert datas(parse(stream)) == ["a", "b", "c", "d"]
    assert datas(parse_bytewise(stream)) == ["a", "b", "c", "d"]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    # Were the LF a second line end, the empty line would dispatch "a" early and split it.
    events = parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert datas(events) == ["a\nb"]


def test_cr_at_chunk_end_then_non_lf() -> None:
    assert datas(parse(b"data: a\r", b"\r")) == ["a"]
    assert datas(parse(b"data: a\r", b"data: b\r\r")) == ["a\nb"]


def test_cr_at_chunk_end_then_empty_chunk_then_lf() -> None:
    assert datas(parse(b"data: a\r", b"", b"\ndata: b\n\n")) == ["a\nb"]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c"])
def test_only_cr_lf_end_lines(separator: str) -> None:
    payload = '{"revised_prompt": "a' + separator + 'b"}'
    stream = b"data: " + payload.encode() + b"\n\n"
    assert datas(parse(stream)) == [payload]
    assert datas(parse_bytewise(stream)) == [payload]


def test_data_lines_joined_with_lf() -> None:
    assert datas(parse(b"data: a\ndata: b\ndata:\ndata: c\n\n")) == ["a\nb\n\nc"]


def test_one_leading_space_stripped_only() -> None:
    events = parse(b"data:  two spaces\n\ndata:none\n\ndata:\tTab\n\n")
    assert datas(events) == [" two spaces", "none", "\tTab"]


def test_value_may_contain_colons() -> None:
    assert datas(parse(b'data: {"a": "b:c"}\n\n')) == ['{"a": "b:c"}']


def test_comments_ignored() -> None:
    events = parse(b": keepalive\n:\n: keepalive\r\ndata: x\n: between\n\n")
    assert datas(events) == ["x"]


def test_keepalives_only_give_no_event() -> None:
    assert parse(b": keepalive\n\n" * 50) == []


def test_empty_events_dropped() -> None:
    assert parse(b"\n\n\n\r\n\r\r") == []
    assert parse(b"event: ping\n\nid: 3\n\nretry: 10\n\n") == []


def test_data_field_with_empty_value_dispatches() -> None:
    assert datas(parse(b"data\n\ndata:\n\n")) == ["", ""]


def test_event_id_retry_fields() -> None:
    events = parse(b"event: message\nid: 7\nretry: 1500\ndata: x\n\nevent: result\ndata: y\n\n")
    assert events[0] == SSEEvent(data="x", event="message", id="7", retry=1500)
    # The last event id persists; event type and retry belong to one event.
    assert events[1] == SSEEvent(data="y", event="result", id="7", retry=None)


def test_bad_retry_and_nul_id_ignored() -> None:
    events = parse(b"id: 1\ndata: a\n\nretry: 12a\nid: x\x00y\ndata: b\n\n")
    assert events[1].retry is None
    assert events[1].id == "1"


def test_event_type_defaults_to_message() -> None:
    assert parse(b"data: a\n\n")[0].event == "message"
    assert parse(b"event:\ndata: a\n\n")[0].event == "message"


def test_unknown_fields_ignored() -> None:
    assert datas(parse(b"foo: bar\ndata: a\nbaz\n\n")) == ["a"]


def test_event_cut_by_eof_is_discarded() -> None:
    assert datas(parse(b"data: whole\n\ndata: cut")) == ["whole"]
    assert datas(parse(b"data: whole\n\ndata: ended line but no blank\n")) == ["whole"]


def test_close_discards_pending_state() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: cut\ndata: more") == []
    parser.close()
    assert datas(parser.feed(b"data: fresh\n\n")) == ["fresh"]


def test_leading_bom_stripped_once() -> None:
    assert datas(parse(b"\xef\xbb\xbfdata: a\n\n")) == ["a"]
    assert datas(parse(b"\xef", b"\xbb\xbfdata: a\n\n")) == ["a"]


def test_invalid_utf8_replaced_not_raised() -> None:
    assert datas(parse(b"data: \xff\n\n")) == ["\ufffd"]


def test_utf8_split_across_chunks() -> None:
    text = "é\u2028ü"
    encoded = b"data: " + text.encode() + b"\n\n"
    assert datas(parse_bytewise(encoded)) == [text]


def test_many_events_in_one_chunk() -> None:
    stream = b"".join(b"data: %d\n\n" % i for i in range(1000))
    assert datas(parse(stream)) == [str(i) for i in range(1000)]


def test_chunk_splits_everywhere_agree() -> None:
    stream = b": k\r\nevent: e\rid: 9\ndata: a\r\ndata: b\r\n\r\n: k\n\ndata: c\r\r"
    whole = parse(stream)
    for cut in range(len(stream) + 1):
        assert parse(stream[:cut], stream[cut:]) == whole


def test_accepts_bytearray_and_memoryview() -> None:
    parser = SSEParser()
    events = parser.feed(bytearray(b"data: a\n"))
    events += parser.feed(bytes(memoryview(b"\n")))
    assert datas(events) == ["a"]


def test_huge_line_in_small_chunks_is_linear() -> None:
    line = b"data: " + b"x" * (8 * 1024 * 1024) + b"\n\n"
    chunks = [line[i:i + 16384] for i in range(0, len(line), 16384)]
    start = time.perf_counter()
    events = parse(*chunks)
    elapsed = time.perf_counter() - start
    assert len(events) == 1 and len(events[0].data) == 8 * 1024 * 1024
    # Quadratic re-scanning would take tens of seconds here; linear is tens of milliseconds.
    assert elapsed < 1.0, elapsed


def test_huge_line_with_keepalives_before_it() -> None:
    body = b": keepalive\n" * 1000 + b"data: " + b"y" * (4 * 1024 * 1024) + b"\r\n\r\n"
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)]
    start = time.perf_counter()
    events = parse(*chunks)
    assert time.perf_counter() - start < 1.0
    assert len(events[0].data) == 4 * 1024 * 1024
