"""One table from the router's gRPC status codes to HTTP statuses and OpenAI's error JSON.

Every refusal of the HTTP front goes through `HttpError`: the router's own errors
(RequestError / GenerateError, which carry a grpc.StatusCode) are converted by
`from_status`, and the front's checks (JSON, fields, templates, lengths) raise it
directly. The body is OpenAI's shape, which the official SDKs turn into their typed
exceptions (BadRequestError, NotFoundError, RateLimitError, ...):

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class HttpStatus:
    status: int
    type: str  # OpenAI's error "type"
    code: str | None = None  # OpenAI's error "code"


# grpc.StatusCode -> what an OpenAI client sees. 429 carries Retry-After (admission control
# sheds load with RESOURCE_EXHAUSTED), 503 says no worker can serve the model right now.
STATUS_TABLE: dict[grpc.StatusCode, HttpStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpStatus(400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: HttpStatus(401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: HttpStatus(403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: HttpStatus(404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: HttpStatus(409, "invalid_request_error", "conflict"),
    grpc.StatusCode.ABORTED: HttpStatus(409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpStatus(429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: HttpStatus(499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: HttpStatus(501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: HttpStatus(503, "service_unavailable", "no_routable_worker"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpStatus(504, "timeout"),
}
INTERNAL = HttpStatus(500, "internal_error")
DEFAULT_RETRY_AFTER_S = 1.0


class HttpError(Exception):
    """A request the HTTP front refuses, with its HTTP status and OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> HttpError:
        return cls(400, message, param=param)

    @classmethod
    def from_status(cls, code: grpc.StatusCode, message: str,
                    retry_after_s: float | None = None) -> HttpError:
        st = STATUS_TABLE.get(code, INTERNAL)
        if st.status == 429 and retry_after_s is None:
            retry_after_s = DEFAULT_RETRY_AFTER_S
        return cls(st.status, message, st.type, st.code, retry_after_s=retry_after_s)

    @classmethod
    def from_exception(cls, e: Exception) -> HttpError:
        """RequestError / GenerateError (or anything with .code and .message); a
        `retry_after_s` attribute, where admission control sets one, becomes Retry-After."""
        code = getattr(e, "code", None)
        if not isinstance(code, grpc.StatusCode):
            return cls(500, f"internal error: {type(e).__name__}", INTERNAL.type)
        hint = getattr(e, "retry_after_s", None)
        hint = float(hint) if isinstance(hint, int | float) and math.isfinite(hint) else None
        return cls.from_status(code, str(getattr(e, "message", e)), hint)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.retry_after_s is not None:
            # Retry-After takes whole seconds (RFC 9110 §10.2.3)
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return h
