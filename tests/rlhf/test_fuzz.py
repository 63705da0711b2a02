"""Property-based requests against the protocol routes (schemathesis, from their OpenAPI schema): whatever the
body, the answer is never a 5xx and answers conform to the documented schema and status codes."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

PATHS = ["/get_reward", "/classify", "/score/chat"]


@pytest.mark.parametrize("path", PATHS)
def test_protocol_route_never_fails_with_5xx(rm_url: str, path: str) -> None:
    # Driven by hand rather than through schemathesis' pytest plugin, which does not support this pytest.
    schema = schemathesis.openapi.from_url(f"{rm_url}/openapi.json")
    operation = schema["/" + path.lstrip("/")]["POST"]

    @given(case=operation.as_strategy())
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        case.call_and_validate(
            base_url=rm_url,
            checks=[not_a_server_error, response_schema_conformance, status_code_conformance],
            timeout=30,
        )

    check()
