"""A fake of the image provider (see docs/CONTRACTS.md): real HTTP, real media bytes, knobs."""

from fake_upstream.app import FakeConfig, FakeServer, build_app, serve

__all__ = ["FakeConfig", "FakeServer", "build_app", "serve"]
