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
    """Subclasses name their status (and whether a retry can help) in the class line:
    `class Busy(ServiceError, status=429, retry=True)`; a subclass without them inherits its parent's."""

    status: ClassVar[int] = 500
    retry: ClassVar[bool] = False  # answer with Retry-After: the same request may succeed later
    headers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, status: int | None = None, retry: bool | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.status = cls.status if status is None else status
        cls.retry = cls.retry if retry is None else retry

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Invalid(ServiceError, status=422):
    """Well-formed JSON whose content cannot be served as asked."""


class TooLarge(ServiceError, status=413):
    """Past a configured size limit."""


class RequestTimeout(ServiceError, status=408):
    """The request body did not arrive in time."""


class UnsupportedMediaType(ServiceError, status=415):
    """A request body that is not JSON."""


class Unauthorized(ServiceError, status=401):
    """No bearer token, or not the configured one (the guard's and the routes' check)."""

    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self, detail: str = "missing or wrong bearer token") -> None:
        super().__init__(detail)


class NotFound(ServiceError, status=404):
    """No such user (or other named thing)."""


class Conflict(ServiceError, status=409):
    """The request contradicts the state it was meant for."""


class Busy(ServiceError, status=429, retry=True):
    """Overloaded: nothing was done; retry after Retry-After."""


class Unavailable(ServiceError, status=503, retry=True):
    """A dependency (the model, Redis) is not there now; retry after Retry-After."""


def error_response(exc: ServiceError, retry_after_s: int) -> JSONResponse:
    """The one answer to any ServiceError."""
    headers = {**exc.headers, **({"Retry-After": str(retry_after_s)} if exc.retry else {})}
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers or None)
