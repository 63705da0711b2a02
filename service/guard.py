"""RequestGuard: pure ASGI, ahead of routing. Everything a request body can cost is bounded here, before FastAPI
reads it and pydantic builds models from it:

1. auth: a request that carries a body (any method but GET/HEAD/OPTIONS) is refused with 401 before a byte of
   its body is read, so an unauthenticated client costs neither memory nor parsing (the routes' own auth
   dependency still runs, for GET routes and as a second check);
2. size: past PAL_MAX_BODY_BYTES by Content-Length before reading, or while reading a chunked body -> 413;
3. time: the whole body must arrive within PAL_BODY_TIMEOUT_S -> 408 (a client dripping bytes holds no slot);
4. media type: a body must be JSON (application/json or +json, or no Content-Type) -> 415;
5. strict JSON: malformed JSON, invalid UTF-8, lone surrogates, NaN/Infinity/overflowing numbers and duplicate
   keys anywhere in the body, extra fields included -> 422 (the stdlib parser accepts all but the first two);
6. counts: past PAL_MAX_JSON_VALUES values in the body (estimated on the bytes, before parsing) or a list longer
   than the request limits (after parsing, before pydantic) -> 413, so a body of 2M `{}` items is refused
   without building 2M models or 2M validation errors.

Large bodies are parsed in a worker thread: parsing 64 MB is seconds of CPU that must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.errors import (
    Invalid,
    RequestTimeout,
    ServiceError,
    TooLarge,
    Unauthorized,
    UnsupportedMediaType,
    error_response,
)

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})
_THREAD_PARSE_BYTES = 64 * 1024  # below this the checks take ~1 ms or less: a thread hop would cost as much
# A JSON string literal, escapes included; removed before counting structural characters.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")


def authorized(header: str | None, key: str) -> bool:
    """`Authorization: Bearer <key>`, compared in constant time."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.encode())


def value_bound(body: bytes) -> int:
    """An upper bound on the JSON values (keys included) in `body`: every value is the root, the first in a
    container, or follows a ',' or ':'. Characters inside strings are counted too, hence only a bound."""
    return 1 + sum(body.count(c) for c in (b"[", b"{", b",", b":"))


def count_values(body: bytes, limit: int) -> int:
    """`value_bound` of the body, with the string literals removed once the raw bound is past `limit`."""
    bound = value_bound(body)
    return bound if bound <= limit else value_bound(_STRING.sub(b'""', body))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Invalid(f"duplicate key {key!r} in a JSON object")
        out[key] = value
    return out


def _no_constant(name: str) -> float:
    raise Invalid(f"{name} is not a number JSON allows (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Invalid(f"number {text[:40]} is out of range (numbers must be finite)")
    return value


def parse_strict(body: bytes) -> Any:
    """Parse like json.loads, refusing what it accepts beyond RFC 8259 (NaN, Infinity, duplicate keys)."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite)
    except UnicodeDecodeError as e:
        raise Invalid(f"request body is not valid UTF-8: {e.reason} at byte {e.start}") from e
    except json.JSONDecodeError as e:
        raise Invalid(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except RecursionError as e:
        raise Invalid("invalid JSON: nested too deeply") from e
    except ValueError as e:  # e.g. an integer past Python's digit limit
        raise Invalid(f"invalid JSON: {e}") from e


def check_tree(value: Any, max_list: int) -> None:
    """Every list at most `max_list` long, no string with a lone surrogate (not encodable text). Iterative:
    the tree is already bounded by PAL_MAX_JSON_VALUES, and its depth by the parser."""
    stack: list[tuple[str, Any]] = [("body", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise Invalid(f"{where}: a lone UTF-16 surrogate is not valid text")
        elif isinstance(v, dict):
            for k, item in v.items():
                if _SURROGATE.search(k):
                    raise Invalid(f"{where}: a key holds a lone UTF-16 surrogate")
                stack.append((f"{where}.{k}" if where != "body" else k, item))
        elif isinstance(v, list):
            if len(v) > max_list:
                raise TooLarge(
                    f"{where} has {len(v)} elements; no list in a request may have more than {max_list} "
                    "(PAL_MAX_ITEMS_PER_REQUEST)",
                )
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(v))


def check_json(body: bytes, max_values: int, max_list: int) -> None:
    """All body checks that need no I/O: value count on the bytes, then strict parse, then the tree."""
    n = count_values(body, max_values)
    if n > max_values:
        raise TooLarge(f"request body holds up to {n} JSON values; the limit is {max_values} (PAL_MAX_JSON_VALUES)")
    check_tree(parse_strict(body), max_list)


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True  # FastAPI reads a body without Content-Type as JSON
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        # The largest list a route accepts; the routes still check their own (smaller) limits after parsing.
        self.max_list = max(settings.max_items_per_request, settings.max_comparisons_per_request)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODYLESS:
            await self.app(scope, receive, send)
            return
        try:
            messages = await self._read(scope, receive)
        except ServiceError as e:  # answered here, before routing, exactly as the app answers it
            await error_response(e, self.settings.retry_after_s)(scope, receive, send)
            return
        if messages is None:  # the client went away while sending
            return
        await self.app(scope, _replay(messages, receive), send)

    async def _read(self, scope: Scope, receive: Receive) -> list[Message] | None:
        s = self.settings
        headers = Headers(scope=scope)
        if s.api_key and not authorized(headers.get("authorization"), s.api_key):
            raise Unauthorized()
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > s.max_body_bytes:
            raise TooLarge(f"request body of {int(length)} bytes; the limit is {s.max_body_bytes} (PAL_MAX_BODY_BYTES)")
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestTimeout(
                    f"request body not received within {s.body_timeout_s:g} s (PAL_BODY_TIMEOUT_S)"
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > s.max_body_bytes:
                raise TooLarge(
                    f"request body over {s.max_body_bytes} bytes; the limit is {s.max_body_bytes} (PAL_MAX_BODY_BYTES)",
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            if not _is_json(headers.get("content-type")):
                raise UnsupportedMediaType(
                    f"content-type {headers.get('content-type')!r}: request bodies must be application/json"
                )
            if len(body) < _THREAD_PARSE_BYTES:
                check_json(body, s.max_json_values, self.max_list)
            else:
                await asyncio.to_thread(check_json, body, s.max_json_values, self.max_list)
        return [{"type": "http.request", "body": body, "more_body": False}]


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """The already read body first, then the connection's own messages (e.g. the disconnect)."""

    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()

    return replayed
