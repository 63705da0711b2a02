"""Bearer-token auth (Settings.api_key) for scoring and mutating routes; health/info/metrics stay open.

Requests with a body are already checked by service.guard.RequestGuard before their body is read; this
dependency covers the GET routes and stays on every protected route as a second check.
"""

from __future__ import annotations

import ipaddress

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings
from service.errors import Unauthorized
from service.guard import authorized

_bearer = HTTPBearer(auto_error=False, description="PAL_API_KEY, when the service sets one")


async def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    expected: str | None = request.app.state.settings.api_key
    if not expected:
        return
    header = None if credentials is None else f"Bearer {credentials.credentials}"
    if not authorized(header, expected):
        raise Unauthorized()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0-like wildcard: reachable from elsewhere


def check_auth_settings(settings: Settings) -> None:
    """Refuse to serve every route to the network without a key, unless that is asked for explicitly."""
    if settings.api_key is None and not settings.allow_no_auth and not is_loopback(settings.host):
        raise SystemExit(
            f"refusing to serve on {settings.host} without PAL_API_KEY: anyone reaching the port could adapt and "
            "delete users. Set PAL_API_KEY, or PAL_ALLOW_NO_AUTH=true to serve without auth on purpose."
        )
