"""Hostile input against a live server (uvicorn on loopback, standalone redis-server): always a clear 4xx with a
JSON message, never a 5xx, and no state written by a refused request.

Limits come from tests/reliability/conftest.py LIMITS (texts 4000 chars, 64 items, 32 comparisons, 256 KiB).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.reliability.conftest import LIMITS, Live

JSON = {"content-type": "application/json"}
CMP = {"prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.fixture
def c(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def _clear_4xx(r: httpx.Response, status: int | tuple[int, ...], *words: str) -> str:
    allowed = (status,) if isinstance(status, int) else status
    assert r.status_code in allowed, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    for w in words:
        assert w in detail, (w, detail)
    return detail


def _keys(live: Live) -> set[bytes]:
    return set(live.redis.client().keys("*"))


# Every route that reads text, with a builder putting `text` into its one text field.
TEXT_ROUTES = {
    "score.prompt": ("/score", lambda t: {"items": [{"prompt": t, "response": "r"}]}),
    "score.response": ("/score", lambda t: {"items": [{"prompt": "p", "response": t}]}),
    "adapt.chosen": ("/users/texts/adapt", lambda t: {"comparisons": [{**CMP, "chosen": t}]}),
    "chat.messages": (
        "/score/chat",
        lambda t: {"items": [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "r"}]}]},
    ),
    "get_reward.query": ("/get_reward", lambda t: {"query": [t]}),
    "classify.input": ("/classify", lambda t: {"input": [t]}),
}


RLHF_ROUTES = {"/score/chat", "/get_reward", "/classify"}


@pytest.mark.parametrize("where", sorted(TEXT_ROUTES))
def test_huge_texts_past_the_limit_are_422_or_cut_on_rlhf_routes(where: str, c: httpx.Client) -> None:
    path, body = TEXT_ROUTES[where]
    limit = LIMITS["max_text_chars"]
    at_limit = ("word " * limit)[:limit]
    r = c.post(path, json=body(at_limit))
    assert r.status_code == 200, r.text[:300]
    if path == "/score":
        assert r.json()["results"][0]["truncated"] is True  # 4000 chars > 64 tokens: cut, and said so
    if path in RLHF_ROUTES:
        # A refused item fails an RLHF run's whole batch (#15): these routes cut the text and say so.
        r = c.post(path, json=body(at_limit + "x"))
        assert r.status_code == 200, r.text[:300]
        out = r.json()
        if path == "/get_reward":
            assert out["extra_logs"]["truncated"] == [1.0], out
        elif path == "/score/chat":
            assert out["results"][0]["truncated"] is True and "text_cut" in out["results"][0]["flags"], out
        else:  # vLLM's classify shape has no flags; the cut is counted in /metrics
            assert math.isfinite(out["data"][0]["probs"][0]), out
    else:
        _clear_4xx(c.post(path, json=body(at_limit + "x")), (413, 422), str(limit))
    _clear_4xx(c.post(path, json=body("x" * 1_000_000)), 413, "PAL_MAX_BODY_BYTES")


def test_empty_and_blank_strings(c: httpx.Client) -> None:
    _clear_4xx(c.post("/score", json={"items": [{"prompt": "p", "response": ""}]}), 422, "response")
    _clear_4xx(c.post("/users/e/adapt", json={"comparisons": [{**CMP, "chosen": ""}]}), 422, "chosen")
    _clear_4xx(c.post("/users/e/adapt", json={"comparisons": [{**CMP, "rejected": ""}]}), 422, "rejected")
    # An empty prompt is allowed by the API; blank and NUL-only texts are still texts and score finitely.
    for item in ({"prompt": "", "response": " "}, {"prompt": "\u0000", "response": "\u0000"}, {"response": "\t\n"}):
        r = c.post("/score", json={"items": [item]})
        assert r.status_code == 200 and math.isfinite(r.json()["results"][0]["reward"]), (item, r.text)


def test_invalid_unicode_is_a_clear_4xx_and_odd_valid_unicode_scores(live: Live, c: httpx.Client) -> None:
    keys = _keys(live)
    # JSON escapes of lone surrogates are not text (no UTF-8 encodes them): refused with 422 naming the field, and
    # nothing stored (issue 16: one outcome, not "200 or any 4xx").
    lone = {
        "/score": [
            b'{"items": [{"prompt": "\\ud800", "response": "r"}]}',
            b'{"items": [{"prompt": "p", "response": "x \\udfff y"}]}',
            # A surrogate encoded as UTF-8 bytes decodes (surrogatepass) to the same lone surrogate.
            b'{"items": [{"prompt": "p", "response": "\xed\xa0\x80"}]}',
        ],
        "/users/lone/adapt": [
            b'{"comparisons": [{"prompt": "\\udbff", "chosen": "c", "rejected": "r"}]}',
            b'{"comparisons": [{"prompt": "p", "chosen": "\\udc00", "rejected": "r"}]}',
        ],
        "/get_reward": [b'{"query": ["\\ud800 hi"]}'],
        "/classify": [b'{"input": "\\udc00"}'],
        "/score/chat": [
            b'{"items": [{"response": "\\ud800"}]}',
            b'{"items": [{"prompt": "p", "response": "\xed\xa0\x80"}]}',
        ],
    }
    for path, bodies in lone.items():
        for body in bodies:
            _clear_4xx(c.post(path, content=body, headers=JSON), 422, "surrogate")
    _clear_4xx(c.get("/users/lone"), 404)
    invalid_bytes = [
        b'{"items": [{"prompt": "p\xff\xfe", "response": "r"}]}',
        b'{"items": [{"prompt": "p", "response": "\xc0\xaf"}]}',  # overlong '/'
        b"\xff\xfe{\x00}\x00",
    ]
    for path in ("/score", "/users/uni/adapt", "/get_reward", "/classify", "/score/chat"):
        for body in invalid_bytes:
            r = c.post(path, content=body, headers=JSON)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            _clear_4xx(r, r.status_code)
    assert _keys(live) == keys  # nothing stored for "uni"
    odd = ["e\u0301\u0301\u0301", "\u202eRTL override", "\U0001f600" * 500, "\ufeffBOM", "zero\u200bwidth", "ﷺ" * 300]
    r = c.post("/score", json={"items": [{"prompt": t, "response": t} for t in odd]})
    assert r.status_code == 200 and all(math.isfinite(x["reward"]) for x in r.json()["results"])


NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]


@pytest.mark.parametrize("token", NON_FINITE, ids=[t.decode() for t in NON_FINITE])
def test_nan_and_infinity_anywhere_are_422(token: bytes, live: Live, c: httpx.Client) -> None:
    keys = _keys(live)
    bodies = [
        ("/score", b'{"items": [{"prompt": %s, "response": "r"}]}'),
        ("/score", b'{"items": [{"prompt": "p", "response": "r"}], "return_prototypes": %s}'),
        ("/score", b'{"items": [{"prompt": "p", "response": "r", "user_id": %s}]}'),
        ("/score", b'{"items": %s}'),
        ("/users/nan/adapt", b'{"comparisons": [{"prompt": "p", "chosen": %s, "rejected": "r"}]}'),
        ("/get_reward", b'{"query": ["q"], "labels": [%s]}'),
        ("/get_reward", b'{"query": %s}'),
        ("/classify", b'{"input": "x", "activation": %s}'),
        ("/score/chat", b'{"items": [{"response": "r", "user_id": %s}]}'),
    ]
    for path, template in bodies:
        r = c.post(path, content=template % token, headers=JSON)
        _clear_4xx(r, 422)
    assert _keys(live) == keys


def test_giant_batches_and_bodies_are_413(live: Live, c: httpx.Client) -> None:
    n_items, n_cmps = LIMITS["max_items_per_request"], LIMITS["max_comparisons_per_request"]
    item = {"prompt": "p", "response": "r"}
    assert c.post("/score", json={"items": [item] * n_items}).status_code == 200
    _clear_4xx(c.post("/score", json={"items": [item] * (n_items + 1)}), 413, "PAL_MAX_ITEMS_PER_REQUEST")
    _clear_4xx(c.post("/score", json={"items": [item] * 50_000}), 413, "PAL_MAX_BODY_BYTES")
    _clear_4xx(c.post("/users/big/adapt", json={"comparisons": [CMP] * (n_cmps + 1)}), 413, "COMPARISONS")
    _clear_4xx(c.post("/get_reward", json={"query": ["q"] * (n_items + 1)}), 413, "PAL_MAX_ITEMS_PER_REQUEST")
    _clear_4xx(c.post("/classify", json={"input": ["q"] * (n_items + 1)}), 413, "PAL_MAX_ITEMS_PER_REQUEST")
    _clear_4xx(c.post("/score/chat", json={"items": [item] * (n_items + 1)}), 413, "PAL_MAX_ITEMS_PER_REQUEST")
    assert not any(b"{big}" in k for k in _keys(live))


def test_chunked_body_past_the_limit_is_413_without_being_read_whole(c: httpx.Client) -> None:
    """No Content-Length (Transfer-Encoding: chunked) must not be a way around PAL_MAX_BODY_BYTES."""
    limit = LIMITS["max_body_bytes"]

    def body() -> Iterator[bytes]:
        yield b'{"items": [{"prompt": "'
        for _ in range(4 * limit // 8192):
            yield b"x" * 8192
        yield b'", "response": "r"}]}'

    r = c.post("/score", content=body(), headers=JSON)
    _clear_4xx(r, 413, "PAL_MAX_BODY_BYTES")
    # A small chunked body still works.
    r = c.post("/score", content=iter([b'{"items": [{"prompt": "p", ', b'"response": "r"}]}']), headers=JSON)
    assert r.status_code == 200, r.text


def test_malformed_json_and_content_types_are_4xx(c: httpx.Client) -> None:
    for body in (b"", b"{", b"[]", b"null", b"1", b'"s"', b"[" * 50_000 + b"]" * 50_000, b'{"items": [' + b"{}," * 9):
        for path in ("/score", "/users/m/adapt", "/get_reward", "/classify", "/score/chat"):
            r = c.post(path, content=body, headers=JSON)
            assert 400 <= r.status_code < 500, (path, body[:20], r.status_code, r.text[:200])
            _clear_4xx(r, r.status_code)
    # A JSON body under another media type: 415, on every route (issue 16: one outcome, not "200 or any 4xx").
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"):
        for path in ("/score", "/users/m/adapt", "/get_reward", "/classify", "/score/chat"):
            r = c.post(path, content=b'{"items": [{"response": "r"}]}', headers={"content-type": ctype})
            _clear_4xx(r, 415, "application/json")
    for ctype in ("application/json; charset=utf-8", "application/vnd.api+json", "APPLICATION/JSON"):
        r = c.post("/score", content=b'{"items": [{"response": "r"}]}', headers={"content-type": ctype})
        assert r.status_code == 200, (ctype, r.status_code, r.text[:200])


# Ids outside [A-Za-z0-9._:@-]{1,128}: path traversal, Redis globs and braces (hash tags), CR/LF, NUL, unicode.
# Any string of 1..512 characters is a user id (#15): these are stored under encoded keys, never raw.
MALICIOUS_IDS = [
    "../../etc/passwd", "..\\..\\x", "a/b", "a:b*", "*", "?", "[ab]", "{u}", "u}:w", "x}:c", "a b", "u\r\nFLUSHALL",
    "u\n", "\nu", "u\r", "u\t", "u\x00", "é", "u\u200b", "\U0001f600", "u" * 129, " ", "%", "u%00", "'; --",
]  # fmt: skip


@pytest.mark.parametrize("user", MALICIOUS_IDS, ids=[repr(u)[:24] for u in MALICIOUS_IDS])
def test_malicious_user_ids_stay_inside_their_own_encoded_keys(user: str, live: Live, c: httpx.Client) -> None:
    keys = _keys(live)
    q = quote(user, safe="")
    r = c.post(f"/users/{q}/adapt", json={"comparisons": [CMP]})
    assert r.status_code == 200 and r.json()["user_id"] == user, r.text
    added = {k.decode() for k in _keys(live) - keys}
    assert len(added) == 5 and all(k.startswith("pal:u:{~") for k in added), added  # c, seq, gen, bytes, w of one user
    tag = next(iter(added)).split("{", 1)[1].split("}", 1)[0]
    assert not set(tag) & set("{}*?[] \r\n\x00/\\%'"), tag  # no hash tag, glob, space, control char
    assert c.get(f"/users/{q}").json()["user_id"] == user
    item = {"prompt": "p", "response": "r", "user_id": user}
    assert c.post("/score", json={"items": [item]}).json()["results"][0]["personalized"] is True
    assert c.post("/score/chat", json={"items": [item]}).json()["results"][0]["personalized"] is True
    reward = c.post("/get_reward", json={"query": ["q"], "labels": [user]}).json()
    assert reward["extra_logs"]["personalized"] == [1.0]
    r = c.delete(f"/users/{q}")
    assert r.status_code == 200 and r.json()["user_id"] == user
    assert _keys(live) == keys


def test_empty_and_over_long_user_ids_are_refused_and_write_nothing(live: Live, c: httpx.Client) -> None:
    keys = _keys(live)
    for user in ("", "u" * 513):
        for method, body in (("post", {"comparisons": [CMP]}), ("get", None), ("delete", None)):
            path = f"/users/{quote(user, safe='')}" + ("/adapt" if method == "post" else "")
            _clear_4xx(c.request(method, path, json=body), (404, 405, 422))
        _clear_4xx(c.post("/score", json={"items": [{"prompt": "p", "response": "r", "user_id": user}]}), 422)
        # On the RLHF routes a label that names no user scores with the population: never a failed batch.
        chat = c.post("/score/chat", json={"items": [{"response": "r", "user_id": user}]}).json()
        assert chat["results"][0]["personalized"] is False
    assert _keys(live) == keys


def _in_path(user: str) -> str:
    # Dots escaped too: a literal "." or ".." path segment is folded away by URL normalization before sending.
    return quote(user, safe="").replace(".", "%2E")


def test_odd_but_valid_user_ids_stay_inside_their_own_keys(live: Live, c: httpx.Client) -> None:
    ids = ["..", ".", "a:b", "a:b:c", "@", "-", "u" * 128, "A.B_C-D@E:F"]
    for user in ids:
        r = c.post(f"/users/{_in_path(user)}/adapt", json={"comparisons": [CMP]})
        assert r.status_code == 200 and r.json()["user_id"] == user, r.text
    keys = {k.decode() for k in _keys(live)}
    for user in ids:
        own = {k for k in keys if k.startswith(f"pal:u:{{{user}}}:")}
        assert own == {f"pal:u:{{{user}}}:{kind}" for kind in ("c", "seq", "gen", "bytes", "w")}, (user, own)
        assert c.delete(f"/users/{_in_path(user)}").status_code == 200
    # "a:b" deleting did not touch "a:b:c" and vice versa: every id had exactly its own keys, now all gone.
    assert not any(
        k.startswith("pal:u:{") and k.split("{")[1].split("}")[0] in ids for k in map(bytes.decode, _keys(live))
    )
