"""The fake's configuration and its mutable state: stats, billing, the request log."""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from fake_upstream.catalog import catalogue

REQUEST_LOG_SIZE = 1000


@dataclass
class FakeConfig:
    latency: float = 1.0  # seconds from request to result
    keepalive_interval: float = 0.2  # seconds between `: keepalive` comments
    media_bytes: int = 2048  # approximate size of each media file
    fail_rate: float = 0.0  # fraction answered 500 before the stream (not billed)
    cut_rate: float = 0.0  # fraction whose stream is cut after keepalives (billed)
    rate_limit_rate: float = 0.0  # fraction answered 429 with Retry-After: 1 (not billed)
    # Generations served at once at most: one more is answered 429 (not billed), as a
    # provider with a concurrency limit does; None: no limit.
    max_concurrent: int | None = None
    # The Retry-After (seconds) of those 429s; None: no Retry-After header.
    concurrency_retry_after: float | None = None
    seed: int | None = None  # seeds the random rates and seedless images
    # Replaces the built-in model list (tests that need other caps or prices).
    models: list[dict[str, Any]] | None = field(default=None, repr=False)


class FakeState:
    """Everything the handlers change. Lives on the server's event loop: no locks needed."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.models = catalogue(config.models)
        self.closing = False  # set at shutdown so stalled streams end
        self.in_flight = 0
        self.serving = 0  # accepted generations not finished (what max_concurrent limits)
        self.reset()

    def reset(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.calls = self.billed_calls = self.billed_images = self.billed_cents = 0
        self.media_requests = 0
        self.by_outcome: Counter[str] = Counter()
        self.max_in_flight = self.in_flight
        self.max_serving = self.serving
        self.fail_counts: Counter[str] = Counter()
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)

    def begin(self, body: object, authorization: bool, request_id: str | None = None) -> None:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        # Whether a key came, never the key itself; the x-request-id the call was answered with.
        self.requests.append({"body": body, "authorization": authorization,
                              "request_id": request_id})

    def end(self) -> None:
        self.in_flight -= 1

    def start_serving(self) -> bool:
        """Take one of max_concurrent places; False when all are taken (answer 429)."""
        limit = self.config.max_concurrent
        if limit is not None and self.serving >= limit:
            return False
        self.serving += 1
        self.max_serving = max(self.max_serving, self.serving)
        return True

    def stop_serving(self) -> None:
        self.serving -= 1

    def count(self, outcome: str) -> None:
        self.by_outcome[outcome] += 1

    def bill(self, outcome: str, price_cents: object, n: int) -> None:
        """The provider did the work: the call costs price x n (0 for an unpriced model)."""
        self.count(outcome)
        self.billed_calls += 1
        self.billed_images += n
        # A catalogue may say anything (tests give prices of any value): only a number bills.
        number = isinstance(price_cents, int | float) and not isinstance(price_cents, bool)
        self.billed_cents += (price_cents if number else 0) * n

    def fails_first(self, key: str, times: int) -> bool:
        """True for the first `times` calls carrying `key`."""
        self.fail_counts[key] += 1
        return self.fail_counts[key] <= times

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": self.calls, "billed_calls": self.billed_calls,
            "billed_images": self.billed_images, "billed_cents": self.billed_cents,
            "by_outcome": dict(self.by_outcome), "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight, "media_requests": self.media_requests,
            "max_serving": self.max_serving,
        }
