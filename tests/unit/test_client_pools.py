"""Every HTTP client of a worker is httpx over aiohttp's pool, never httpx's own, with each limit
at the concurrency asked for (aiohttp stops at 100 connections and httpx at 100 unless told).
No server: the clients are built and looked at, nothing is sent."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from pipeline.storage import S3Store, open_store
from pipeline.upstream import UpstreamClient


def assert_pooled_by_aiohttp(client: httpx.AsyncClient, session: aiohttp.ClientSession | None,
                             connections: int) -> None:
    transport = client._transport
    assert isinstance(transport, AiohttpTransport)
    assert transport.client is session is not None
    assert client._mounts == {}  # no proxy transport of httpx's own either
    assert session.connector is not None
    assert (session.connector.limit, session.connector.limit_per_host) == (connections,) * 2
    assert transport.limits.max_connections == connections
    assert transport.limits.max_keepalive_connections == connections
    assert client.follow_redirects is False


def test_the_api_and_media_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # not read: trust_env off

    async def build() -> None:
        client = UpstreamClient("http://192.0.2.1/v1", "sk-air-x", concurrency=300,
                                read_timeout=30.0, connect_timeout=4.0, deadline=900.0,
                                max_media_bytes=1 << 20, allow_private_media=False)
        try:
            assert_pooled_by_aiohttp(client._api_http, client._api, 300)
            assert_pooled_by_aiohttp(client._media_http, client._media, 300)
            timeout = client._api_http.timeout
            assert (timeout.connect, timeout.read, timeout.pool) == (4.0, 30.0, 4.0)
            assert client._media_http.timeout == timeout
        finally:
            await client.aclose()
        assert client._api is not None and client._api.closed
        assert client._media is not None and client._media.closed

    asyncio.run(build())


def test_the_presigned_uploads_client() -> None:
    store = open_store("s3://a-bucket/media", connections=500)
    assert isinstance(store, S3Store) and store.connections == 500

    async def build() -> None:
        client = store._client_for("http://127.0.0.1:9/a-bucket/media/k?X-Amz-Signature=1")
        try:
            transport = client._transport
            assert isinstance(transport, AiohttpTransport)
            assert isinstance(transport.client, aiohttp.ClientSession)
            assert_pooled_by_aiohttp(client, transport.client, 500)
            assert store._client_for("http://127.0.0.1:9/other") is client  # one per loop
        finally:
            await store.aclose()
        assert transport.client.closed

    asyncio.run(build())
