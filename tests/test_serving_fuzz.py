"""Schema fuzzing (schemathesis) against the server's own /openapi.json: for generated requests, valid
and invalid, no 5xx, and every response (status, content type, body) conforms to the document."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)



@pytest.fixture(scope="module")
def api_schema(scoring_server):
    return schemathesis.openapi.from_url(scoring_server.root_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_openapi(case):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "openchat_3.5"      # a served model, so that bodies reach generation (not a 404)
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance], timeout=60)
