"""Errors in OpenAI's JSON shape: every refusal tells the client what was wrong and where."""

from __future__ import annotations

import json

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    405: "invalid_request_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
    505: "invalid_request_error",
}


class ApiError(Exception):
    """A refusal sent to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    error = {"message": message, "type": TYPES.get(status, "api_error"), "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def sse_error_event(message: str, code: str, status: int = 502) -> bytes:
    """An error inside an SSE stream (after the 200 status line is gone): one event, then EOF."""
    return b"data: " + error_body(status, message, None, code) + b"\n\n"
