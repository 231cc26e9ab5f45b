"""The fake upstream over real HTTP: models, plain and SSE results, every knob, billing."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fake_upstream.app import FakeConfig, FakeServer
from pipeline.media import NotMedia, sniff


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(latency=0, keepalive_interval=0.05, seed=7)) as server:
        yield server


@pytest.fixture
def client(fake: FakeServer) -> Iterator[httpx.Client]:
    fake.reset()
    with httpx.Client(timeout=10) as http:
        yield http


def generate(http: httpx.Client, server: FakeServer, /, **body: Any) -> httpx.Response:
    """POST a generation; `fake=` in body is the knobs object, as in a job line."""
    body.setdefault("model", "flux-2-dev")
    body.setdefault("prompt", "a red fox")
    return http.post(f"{server.base_url}/images/generations", json=body)


def lines(raw: bytes) -> list[bytes]:
    """SSE lines: they end at CR, LF or CRLF, never at U+2028."""
    return re.split(rb"\r\n|\r|\n", raw)


def result_event(raw: bytes) -> dict[str, Any]:
    data = [line[6:] for line in lines(raw) if line.startswith(b"data: ")]
    assert data[-1] == b"[DONE]"
    return json.loads(data[0])


def media_of(http: httpx.Client, entry: dict[str, Any]) -> bytes:
    if "b64_json" in entry:
        return base64.b64decode(entry["b64_json"])
    response = http.get(entry["url"])
    assert response.status_code == 200
    return response.content


def error_of(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert {"message", "type", "code"} <= error.keys()
    return error


# --- models ----------------------------------------------------------------------------------

def test_models_list(client: httpx.Client, fake: FakeServer) -> None:
    listing = client.get(f"{fake.base_url}/models").json()
    assert listing["object"] == "list"
    models = {entry["id"]: entry for entry in listing["data"]}
    assert set(models) == {"flux-2-dev", "flux-2-klein-4b", "nano-banana-pro", "gpt-image-1",
                           "wan-2.2", "suno-v5", "preview-model", "gpt-4o-mini"}
    assert models["flux-2-dev"]["image_caps"]["price_per_image_cents"] == 3
    assert models["gpt-image-1"]["image_caps"]["sizes"] == ["1024x1024", "1024x1536",
                                                            "1536x1024"]
    assert models["wan-2.2"]["output_modalities"] == ["image", "video"]
    assert "price_per_image_cents" not in models["preview-model"]["image_caps"]
    assert "image_caps" not in models["gpt-4o-mini"]


# --- results ---------------------------------------------------------------------------------

def test_plain_url_result_is_a_png_of_the_asked_shape(client: httpx.Client,
                                                      fake: FakeServer) -> None:
    response = generate(client, fake, n=2, aspect_ratio="16:9")
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    info = sniff(media_of(client, body["data"][0]))
    assert (info.content_type, info.width, info.height) == ("image/png", 1024, 576)
    assert abs(info.size - 2048) < 64
    assert fake.stats()["media_requests"] == 1


def test_b64_result(client: httpx.Client, fake: FakeServer) -> None:
    response = generate(client, fake, model="gpt-image-1", size="1024x1536",
                        response_format="b64_json")
    info = sniff(media_of(client, response.json()["data"][0]))
    assert (info.width, info.height) == (1024, 1536)


def test_sse_keepalives_then_result_then_done() -> None:
    config = FakeConfig(latency=0.3, keepalive_interval=0.05)
    with FakeServer(config) as slow, httpx.Client(timeout=5) as http:
        response = generate(http, slow, sse=True)
        raw = response.content
        assert response.headers["content-type"].startswith("text/event-stream")
        assert raw.count(b": keepalive\n\n") >= 4
        assert raw.index(b": keepalive") < raw.index(b"data: {")
        assert raw.endswith(b"data: [DONE]\n\n")
        assert sniff(media_of(http, result_event(raw)["data"][0])).content_type == "image/png"


@pytest.mark.parametrize(("model", "kind"), [("wan-2.2", "video/mp4"), ("suno-v5", "audio/mpeg")])
def test_models_return_their_own_media(client: httpx.Client, fake: FakeServer, model: str,
                                       kind: str) -> None:
    entry = generate(client, fake, model=model, response_format="b64_json").json()["data"][0]
    assert sniff(media_of(client, entry)).content_type == kind


@pytest.mark.parametrize(("media", "content_type"), [
    ("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp"), ("gif", "image/gif"),
    ("mp4", "video/mp4"), ("webm", "video/webm"), ("mp3", "audio/mpeg"), ("wav", "audio/wav"),
    ("ogg", "audio/ogg"),
])
def test_media_knob_over_url_and_b64(client: httpx.Client, fake: FakeServer, media: str,
                                     content_type: str) -> None:
    for response_format in ("url", "b64_json"):
        entry = generate(client, fake, response_format=response_format, seed=1,
                         fake={"media": media}).json()["data"][0]
        assert sniff(media_of(client, entry)).content_type == content_type
    url = generate(client, fake, fake={"media": media}).json()["data"][0]["url"]
    assert client.get(url).headers["content-type"] == content_type


def test_media_bytes_knob(client: httpx.Client, fake: FakeServer) -> None:
    entry = generate(client, fake, response_format="b64_json",
                     fake={"media_bytes": 300_000}).json()["data"][0]
    assert abs(len(media_of(client, entry)) - 300_000) < 64


# --- determinism -----------------------------------------------------------------------------

def b64_images(http: httpx.Client, server: FakeServer, /, **body: Any) -> list[bytes]:
    data = generate(http, server, response_format="b64_json", **body).json()["data"]
    return [base64.b64decode(entry["b64_json"]) for entry in data]


def test_same_prompt_and_seed_give_the_same_bytes(client: httpx.Client,
                                                  fake: FakeServer) -> None:
    first = b64_images(client, fake, seed=41, n=3)
    assert b64_images(client, fake, seed=41, n=3) == first
    assert len(set(first)) == 3
    # Image i of seed s is image 0 of seed s + i.
    assert b64_images(client, fake, seed=42)[0] == first[1]
    # The same via url: the token makes the same bytes again.
    urls = generate(client, fake, seed=41).json()["data"]
    assert media_of(client, urls[0]) == first[0]


def test_other_seed_or_prompt_or_no_seed_differ(client: httpx.Client, fake: FakeServer) -> None:
    base = b64_images(client, fake, seed=5)[0]
    assert b64_images(client, fake, seed=6)[0] != base
    assert b64_images(client, fake, seed=5, prompt="a blue fox")[0] != base
    assert b64_images(client, fake)[0] != b64_images(client, fake)[0]


# --- validation: 4xx before anything, never billed -------------------------------------------

@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "no-such-model"}, 404, "model"),
    ({"model": ""}, 400, "model"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": None}, 400, "prompt"),
    ({"n": 5}, 400, "n"),
    ({"n": 0}, 400, "n"),
    ({"n": True}, 400, "n"),
    ({"aspect_ratio": "5:4"}, 400, "aspect_ratio"),
    ({"model": "gpt-image-1", "size": "512x512"}, 400, "size"),
    ({"model": "gpt-image-1", "quality": "ultra"}, 400, "quality"),
    ({"model": "gpt-image-1", "input_images": [{"url": "http://x/a.png"}]}, 400, "input_images"),
    ({"model": "gpt-4o-mini"}, 400, "model"),
    ({"response_format": "png"}, 400, "response_format"),
    ({"seed": "7"}, 400, "seed"),
    ({"fake": {"stal": True}}, 400, "fake.stal"),
    ({"fake": {"media": "bmp"}}, 400, "fake.media"),
    ({"fake": "cut"}, 400, "fake"),
])
def test_validation_errors(client: httpx.Client, fake: FakeServer, body: dict[str, Any],
                           status: int, param: str) -> None:
    response = generate(client, fake, sse=True, **body)
    assert response.status_code == status
    error = error_of(response)
    assert error["param"] == param
    stats = fake.stats()
    assert stats["calls"] == 1 and stats["billed_calls"] == 0
    assert stats["by_outcome"] == {"invalid": 1}


def test_body_that_is_not_a_json_object(client: httpx.Client, fake: FakeServer) -> None:
    for content in (b"not json", b"[1, 2]"):
        response = client.post(f"{fake.base_url}/images/generations", content=content)
        assert response.status_code == 400
    assert fake.requests()[0]["body"] is None


def test_caps_that_are_missing_do_not_limit(client: httpx.Client, fake: FakeServer) -> None:
    # gpt-image-1 lists no aspect ratios; flux lists no sizes or qualities.
    assert generate(client, fake, model="gpt-image-1", aspect_ratio="7:3").status_code == 200
    response = generate(client, fake, size="640x480", quality="whatever")
    info = sniff(media_of(client, response.json()["data"][0]))
    assert (info.width, info.height) == (640, 480)


# --- error knobs -----------------------------------------------------------------------------

def test_status_knob_with_retry_after(client: httpx.Client, fake: FakeServer) -> None:
    response = generate(client, fake, sse=True, fake={"status": 429, "retry_after": 2})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert error_of(response)["type"] == "rate_limit_error"
    response = generate(client, fake, fake={"status": 402})
    assert response.status_code == 402 and "retry-after" not in response.headers
    stats = fake.stats()
    assert stats["billed_calls"] == 0 and stats["by_outcome"] == {"error_status": 2}


def test_fail_first_then_succeed(client: httpx.Client, fake: FakeServer) -> None:
    knobs = {"fail_first": 2, "key": "line-7", "status": 503}
    codes = [generate(client, fake, fake=knobs).status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    # The default status is 500, and another key has its own count.
    other = generate(client, fake, fake={"fail_first": 1, "key": "line-8"})
    assert other.status_code == 500
    stats = fake.stats()
    assert (stats["billed_calls"], stats["billed_cents"]) == (2, 6)


def test_error_event_is_a_200_stream_and_not_billed(client: httpx.Client,
                                                    fake: FakeServer) -> None:
    response = generate(client, fake, sse=True, fake={"error_event": True})
    assert response.status_code == 200
    raw = response.content
    assert raw.startswith(b": keepalive")
    data = [line for line in lines(raw) if line.startswith(b"data: ")]
    assert len(data) == 1 and set(json.loads(data[0][6:])["error"]) >= {"message", "code"}
    stats = fake.stats()
    assert stats["billed_calls"] == 0 and stats["by_outcome"] == {"error_event": 1}


def test_cut_stream_is_billed(client: httpx.Client, fake: FakeServer) -> None:
    with client.stream("POST", f"{fake.base_url}/images/generations",
                       json={"model": "nano-banana-pro", "prompt": "x", "n": 2, "sse": True,
                             "fake": {"cut": True}}) as response:
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            for piece in response.iter_bytes():
                received += piece
    assert b": keepalive" in received and b"data: {" in received
    assert b"[DONE]" not in received
    stats = fake.stats()
    assert (stats["billed_calls"], stats["billed_images"], stats["billed_cents"]) == (1, 2, 24)
    assert stats["by_outcome"] == {"cut": 1}


def test_cut_plain_body(client: httpx.Client, fake: FakeServer) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        generate(client, fake, fake={"cut": True})
    assert fake.stats()["by_outcome"] == {"cut": 1}


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_stall_sends_keepalives_until_the_client_leaves(client: httpx.Client,
                                                        fake: FakeServer) -> None:
    body = {"model": "flux-2-dev", "prompt": "x", "sse": True, "fake": {"stall": True}}
    with client.stream("POST", f"{fake.base_url}/images/generations", json=body) as response:
        pieces = response.iter_bytes()
        received = b"".join(next(pieces) for _ in range(5))
        assert fake.stats()["in_flight"] == 1
    assert set(lines(received)) <= {b": keepalive", b""}
    client.close()
    wait_for(lambda: fake.stats()["in_flight"] == 0)
    stats = fake.stats()
    assert stats["by_outcome"] == {"stall": 1} and stats["billed_cents"] == 3


def test_garbage_is_billed_and_not_media(client: httpx.Client, fake: FakeServer) -> None:
    for response_format in ("url", "b64_json"):
        entry = generate(client, fake, response_format=response_format,
                         fake={"garbage": True}).json()["data"][0]
        with pytest.raises(NotMedia):
            sniff(media_of(client, entry))
    assert fake.stats()["by_outcome"] == {"garbage": 2}
    assert fake.stats()["billed_cents"] == 6


def test_redirect_knob(client: httpx.Client, fake: FakeServer) -> None:
    target = "http://169.254.169.254/latest/meta-data/"
    url = generate(client, fake, fake={"redirect": target}).json()["data"][0]["url"]
    response = client.get(url)
    assert response.status_code == 302 and response.headers["location"] == target


def test_unknown_media_token(client: httpx.Client, fake: FakeServer) -> None:
    assert client.get(f"{fake.origin}/media/not-a-token.png").status_code == 404


# --- stream shape knobs ----------------------------------------------------------------------

def test_line_ends(client: httpx.Client, fake: FakeServer) -> None:
    crlf = generate(client, fake, sse=True, fake={"line_end": "crlf"}).content
    assert crlf.endswith(b"data: [DONE]\r\n\r\n") and crlf.count(b"\n") == crlf.count(b"\r\n")
    cr = generate(client, fake, sse=True, fake={"line_end": "cr"}).content
    assert b"\n" not in cr and cr.endswith(b"data: [DONE]\r\r")
    assert result_event(cr)["data"]


def test_chunked_stream_parses_the_same(client: httpx.Client, fake: FakeServer) -> None:
    chunked = generate(client, fake, sse=True, seed=3, fake={"chunk": 7, "line_end": "crlf"})
    whole = generate(client, fake, sse=True, seed=3, fake={"line_end": "crlf"})
    assert result_event(chunked.content)["data"] == result_event(whole.content)["data"]


def test_event_lines_and_empty_events(client: httpx.Client, fake: FakeServer) -> None:
    raw = generate(client, fake, sse=True, fake={"event_lines": True, "empty_events": 3}).content
    assert b"event: message\ndata: {" in raw and b"\nid: 1\n\n" in raw
    assert b"event: message\ndata: [DONE]\nid: 2\n\n" in raw
    assert b"\n\n\n\n\nevent: message\ndata: {" in raw  # keepalive's blank line + 3 empty events


def test_revised_prompt_keeps_raw_line_separators(client: httpx.Client,
                                                  fake: FakeServer) -> None:
    revised = "a fox\u2028in snow\u2029é"
    raw = generate(client, fake, sse=True, n=2, fake={"revised_prompt": revised}).content
    assert "\u2028".encode() in raw  # raw, not escaped as \\u2028
    assert [entry["revised_prompt"] for entry in result_event(raw)["data"]] == [revised] * 2


def test_latency_knob(client: httpx.Client, fake: FakeServer) -> None:
    started = time.monotonic()
    raw = generate(client, fake, sse=True, fake={"latency": 0.3}).content
    assert time.monotonic() - started >= 0.3
    assert raw.count(b": keepalive") >= 4


# --- global rates ----------------------------------------------------------------------------

def test_rate_limit_rate(fake: FakeServer) -> None:
    with FakeServer(FakeConfig(latency=0, rate_limit_rate=1.0)) as limited, \
            httpx.Client(timeout=5) as http:
        response = generate(http, limited, sse=True)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        # A request whose knobs decide its outcome is left alone.
        assert generate(http, limited, fake={"garbage": True}).status_code == 200
        stats = limited.stats()
    assert stats["by_outcome"] == {"rate_limited": 1, "garbage": 1}
    assert stats["billed_calls"] == 1


def test_fail_rate(fake: FakeServer) -> None:
    with FakeServer(FakeConfig(latency=0, fail_rate=1.0)) as failing, \
            httpx.Client(timeout=5) as http:
        assert generate(http, failing, sse=True).status_code == 500
        assert failing.stats()["billed_calls"] == 0


def test_cut_rate(fake: FakeServer) -> None:
    with FakeServer(FakeConfig(latency=0, cut_rate=1.0)) as cutting, \
            httpx.Client(timeout=5) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            generate(http, cutting, sse=True)
        assert cutting.stats()["by_outcome"] == {"cut": 1}


def test_rates_mix_by_seed(fake: FakeServer) -> None:
    config = FakeConfig(latency=0, rate_limit_rate=0.3, fail_rate=0.3, seed=11)
    with FakeServer(config) as mixed, httpx.Client(timeout=5) as http:
        codes = [generate(http, mixed).status_code for _ in range(60)]
    assert {200, 429, 500} == set(codes)


# --- billing, the request log, concurrency ---------------------------------------------------

def test_billing_is_price_times_n(client: httpx.Client, fake: FakeServer) -> None:
    generate(client, fake, model="gpt-image-1", n=3)
    generate(client, fake, model="wan-2.2", sse=True)
    generate(client, fake, model="preview-model")  # no price: billed, 0 cents
    stats = fake.stats()
    assert (stats["calls"], stats["billed_calls"]) == (3, 3)
    assert (stats["billed_images"], stats["billed_cents"]) == (5, 3 * 4 + 25)
    assert stats["by_outcome"] == {"ok": 3}


def test_request_log_records_bodies_and_whether_a_key_came(client: httpx.Client,
                                                          fake: FakeServer) -> None:
    headers = {"Authorization": "Bearer sk-air-secret"}
    answer = client.post(f"{fake.base_url}/images/generations", headers=headers,
                         json={"model": "flux-2-dev", "prompt": "x", "style": "EDM",
                               "custom": True})
    generate(client, fake)
    logged = fake.requests()
    assert logged[0] == {"body": {"model": "flux-2-dev", "prompt": "x", "style": "EDM",
                                  "custom": True}, "authorization": True,
                         "request_id": answer.headers["x-request-id"]}
    assert logged[1]["request_id"].startswith("req_")
    assert logged[1]["request_id"] != logged[0]["request_id"]
    assert logged[1]["authorization"] is False
    assert "sk-air-secret" not in json.dumps(logged)
    assert client.get(f"{fake.origin}/_fake/requests").json() == logged


def test_stats_and_reset_over_http(client: httpx.Client, fake: FakeServer) -> None:
    generate(client, fake)
    stats = client.get(f"{fake.origin}/_fake/stats").json()
    assert stats["calls"] == 1 and stats["max_in_flight"] == 1
    assert client.post(f"{fake.origin}/_fake/reset").status_code == 200
    assert fake.stats()["calls"] == 0 and fake.requests() == []


def test_in_flight_counts_concurrent_calls() -> None:
    with FakeServer(FakeConfig(latency=0.5, keepalive_interval=0.1)) as slow, \
            httpx.Client(timeout=10, limits=httpx.Limits(max_connections=40)) as http:
        threads = [threading.Thread(target=generate, args=(http, slow), kwargs={"sse": True})
                   for _ in range(30)]
        for thread in threads:
            thread.start()
        wait_for(lambda: slow.stats()["in_flight"] >= 20)
        for thread in threads:
            thread.join()
        stats = slow.stats()
    assert stats["in_flight"] == 0 and stats["max_in_flight"] >= 20
    assert stats["billed_calls"] == 30
