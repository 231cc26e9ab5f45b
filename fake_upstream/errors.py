"""The one exception handlers raise to answer with an OpenAI-style error before any stream."""

from __future__ import annotations

# OpenAI-style error "type" for each status the fake answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "content_policy_violation",
    429: "rate_limit_error",
}


class FakeError(Exception):
    """Answer `status` with {"error": {...}}; `outcome` is the name counted in the stats."""

    def __init__(self, status: int, message: str, *, code: str, outcome: str,
                 param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.outcome = outcome
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {"error": error_object(self.status, self.message, self.code, self.param)}


def error_object(status: int, message: str, code: str, param: str | None = None
                 ) -> dict[str, object]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"message": message, "type": kind, "code": code, "param": param}


def invalid(message: str, param: str | None, code: str = "invalid_value") -> FakeError:
    """A validation failure: 400, never billed."""
    return FakeError(400, message, code=code, outcome="invalid", param=param)
