"""Property-based fuzzing of the whole OpenAPI spec (schemathesis) against a live server: no input, valid or
not, gets a 5xx, and every 4xx carries a JSON message. Operations are read from the served /openapi.json, so
new routes are fuzzed without edits here.

Bounded: MAX_EXAMPLES per operation and mode, derandomized (repeatable in CI), no example database.
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.reliability.conftest import Live

MAX_EXAMPLES = 30


@pytest.fixture(scope="session")
def api_schema(live: Live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


def _fuzz(operation, mode: GenerationMode, seen: list[int]) -> None:
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call(timeout=60)
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        if 400 <= response.status_code < 500 and response.status_code != 405:
            detail = response.json().get("detail")
            assert isinstance(detail, str) and detail, (response.status_code, response.text[:200])

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_generated_request_gets_a_server_error(api_schema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {op.label for op in operations}
    # The spec really is the whole API: the product routes and the RLHF protocols are all in it.
    assert {"POST /score", "POST /users/{user_id}/adapt", "GET /users/{user_id}", "POST /get_reward"} <= labels
    fuzzed = set()
    for op in operations:
        seen: list[int] = []
        try:
            _fuzz(op, mode, seen)
        except hypothesis.errors.Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # an operation without inputs has no invalid request
            continue
        assert seen, f"{op.label}: nothing was generated"
        assert all(s < 500 for s in seen), (op.label, sorted(set(seen)))
        fuzzed.add(op.label)
    # Every operation that takes a body or a path parameter got invalid requests too.
    assert {op.label for op in operations if op.body or op.path_parameters} <= fuzzed
