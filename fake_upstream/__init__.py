"""A fake of the image provider (see docs/CONTRACTS.md): real HTTP, real media bytes, knobs."""

