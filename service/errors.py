"""Every error the service answers with, and its HTTP status: one hierarchy, turned into a response in one place
(`error_response`: {"detail": "<what is wrong>"}, the status, and Retry-After from PAL_RETRY_AFTER_S where a
retry can help). The app's ServiceError handler (service/app.py) and the request guard, which answers before
routing (service/guard.py), both answer through it; code below them raises these and never picks a status.
FastAPI's own validation errors are answered by the app in the same shape.
"""

from __future__ import annotations

from typing import ClassVar

from starlette.responses import JSONResponse


class ServiceError(Exception):
    status: ClassVar[int] = 500
    retry: ClassVar[bool] = False  # answer with Retry-After: the same request may succeed later
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Invalid(ServiceError):
    """Well-formed JSON whose content cannot be served as asked."""

    status = 422


class TooLarge(ServiceError):
    """Past a configured size limit."""

    status = 413


class RequestTimeout(ServiceError):
    """The request body did not arrive in time."""

    status = 408


class UnsupportedMediaType(ServiceError):
    """A request body that is not JSON."""

    status = 415


class Unauthorized(ServiceError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self, detail: str = "missing or wrong bearer token") -> None:  # the guard's and the routes' check
        super().__init__(detail)


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Busy(ServiceError):
    """Overloaded: nothing was done; retry after Retry-After."""

    status = 429
    retry = True


class Unavailable(ServiceError):
    """A dependency (the model, Redis) is not there now; retry after Retry-After."""

    status = 503
    retry = True


def error_response(exc: ServiceError, retry_after_s: int) -> JSONResponse:
    """The one answer to any ServiceError."""
    headers = {**exc.headers, **({"Retry-After": str(retry_after_s)} if exc.retry else {})}
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers or None)
