"""CPU of the HTTP client alone, per render, for one checkout's pipeline (issue 18: what httpx
costs). Nothing else of the pipeline runs: no SQL, no Celery, no store but the S3 one asked for.

    python bench/client_cpu.py --pipeline DIR --api http://127.0.0.1:PORT/v1   # generate+fetch
    python bench/client_cpu.py --pipeline DIR --s3 http://127.0.0.1:PORT       # presigned PUTs

`--api`: each render is one generation (`sse: true`) and the download of its result URL, as a
worker does them, N renders with C in flight, after 50 to warm the pools; against
`imagebatch fake-upstream --latency L` (keepalives every 0.2 s while it waits). `--s3`: N puts of
2 KiB through `S3Store.put_async` (boto3 presigns, the client sends) to an S3 server such as
`python -m moto.server -p PORT`. Prints one JSON line: the process's CPU (user + system) over the
timed renders or puts, per render or put. Alternate two checkouts run after run: the machine
drifts (README.md, Machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="the checkout whose pipeline/ runs")
    parser.add_argument("--api", help="the fake upstream's API base")
    parser.add_argument("--s3", help="an S3 endpoint URL (credentials test/test)")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.pipeline))
    if bool(args.api) == bool(args.s3):
        parser.error("give --api or --s3")
    work = renders(args.api, args.concurrency) if args.api else puts(args.s3)
    print(json.dumps({"pipeline": args.pipeline, **asyncio.run(timed(work, args.n,
                                                                     args.concurrency))}))


def renders(api_base: str, concurrency: int) -> Any:
    from pipeline.upstream import Delivered, UpstreamClient

    client: UpstreamClient | None = None

    async def one(i: int) -> None:
        nonlocal client
        if client is None:  # made on the loop that uses it
            client = UpstreamClient(api_base, "sk-air-bench", concurrency=concurrency,
                                    read_timeout=30, connect_timeout=10, deadline=600,
                                    max_media_bytes=1 << 22, allow_private_media=True)
        outcome = await client.generate({"model": "flux-2-klein-4b", "prompt": f"bench {i}"})
        assert isinstance(outcome, Delivered), outcome
        await client.fetch_media(outcome.data[0]["url"])

    async def close() -> None:
        if client is not None:
            await client.aclose()
    return one, close


def puts(endpoint: str) -> Any:
    os.environ.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    from pipeline.storage import open_store, s3_client

    s3_client().create_bucket(Bucket="client-cpu")
    store = open_store("s3://client-cpu/media")
    data = b"\x89PNG\r\n\x1a\n" + bytes(2040)

    async def one(i: int) -> None:
        await store.put_async(f"k/{i}.png", data, "image/png")
    return one, store.aclose


async def timed(work: Any, n: int, concurrency: int) -> dict[str, float]:
    one, close = work
    slots = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with slots:
            await one(i)

    await asyncio.gather(*(bounded(i) for i in range(50)))
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(bounded(i) for i in range(n)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    await close()
    return {"cpu_ms_each": round(cpu * 1000 / n, 3), "per_s": round(n / wall, 1)}


if __name__ == "__main__":
    main()
