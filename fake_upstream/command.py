"""`imagebatch fake-upstream`: the fake provider served on its own, with its knobs as options.
Only click is imported until the command runs (the CLI's start-up stays light)."""

from __future__ import annotations

from typing import Any

import click


@click.command("fake-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--latency", type=float, default=1.0, show_default=True,
              help="Seconds each render takes (keepalives are sent meanwhile).")
@click.option("--keepalive", "keepalive_interval", type=float, default=0.2, show_default=True,
              help="Seconds between two ': keepalive' comments.")
@click.option("--media-bytes", type=int, default=2048, show_default=True,
              help="Approximate size of each media file.")
@click.option("--fail-rate", type=float, default=0.0, help="Share of calls answered 500.")
@click.option("--cut-rate", type=float, default=0.0, help="Share of streams cut (billed).")
@click.option("--rate-limit-rate", type=float, default=0.0, help="Share answered 429.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="Serve this many generations at once; answer 429 to more.")
@click.option("--concurrency-retry-after", type=click.FloatRange(min=0), default=None,
              help="Retry-After seconds of those 429s (none by default).")
def fake_upstream_command(host: str, port: int, **config: Any) -> None:
    """Serve a fake provider (/v1/models, /v1/images/generations) for trying job files and
    budgets without spending: set IMAGEBATCH_API_BASE=http://HOST:PORT/v1."""
    from fake_upstream.app import FakeConfig, serve

    click.echo(f"fake upstream on http://{host}:{port}/v1 (Ctrl-C stops it)", err=True)
    serve(host, port, FakeConfig(**config))
