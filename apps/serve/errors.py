"""Errors of the HTTP API, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal the server makes is an :class:`ApiError` with its status; the app turns it into
that body (apps/serve/app.py). A bad request is a 4xx with one sentence, never a 500 and never
an error with status 200.
"""

from __future__ import annotations

from tinyllava_edge.errors import TinyLlavaError

# OpenAI's `type` per status (its API answers invalid_request_error for most 4xx).
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class ApiError(TinyLlavaError):
    """One refusal: HTTP `status`, a one-sentence `message`, the request field it is about (`param`,
    e.g. ``messages[1].content[0].image_url``) and a machine-readable `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever the cause carried
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unknown_model(name: str, served: str) -> ApiError:
    return ApiError(404, f"model {name!r} does not exist; this server serves {served!r}", param="model",
                    code="model_not_found")
