"""Every route of the real server (tests/conftest.py's ``server``) fuzzed from its own OpenAPI schema with
schemathesis: no 5xx (but the one a request's own timeout asks for), every status and content type one the
schema documents, every error a JSON body, and the server ready and serving afterwards. Bounded: EXAMPLES
per operation, a few hundred in all."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.helpers import TIMEOUT, ServerThread, encode, scene

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
strategies = pytest.importorskip("hypothesis.strategies")

EXAMPLES = {"GET": 10, "POST": 60}  # per operation, by method: 18 GETs (most without parameters), 3 POSTs


@pytest.fixture(scope="module")
def api_schema(server: ServerThread) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def errors_are_json(ctx: Any, response: Any, case: Any) -> None:
    """An error answers with a JSON object carrying its ``error``: ours ({code, message}) on our routes,
    the protocol's (a message) under /v2."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict) and body.get("error"), f"{response.status_code} without a JSON error: {body}"


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """No 5xx, except the one a request asks for with its own timeout (``timeout_ms``, the protocol's
    ``timeout``): past it, the answer is 504 (the protocol's 503) saying so."""
    if response.status_code in (503, 504) and "within its timeout of" in response.text:
        return
    schemathesis.checks.not_a_server_error(ctx, response, case)


@pytest.mark.slow
def test_every_route_answers_fuzzed_requests(api_schema: Any, server: ServerThread) -> None:
    """Requests that follow the schema and requests that break it (schemathesis' positive and negative
    modes), for every operation; those of /v2/models/{name}... half with the served model's name and
    version, so that they reach more than the 404."""
    info = server.pipeline.model.metadata
    served = {"name": info.model_name, "version": info.model_version}
    checks = schemathesis.checks
    validations = [no_server_error, checks.status_code_conformance, checks.content_type_conformance,
                   errors_are_json]
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {"POST /segment", "POST /v2/models/{name}/infer", "GET /v2/models/{name}/versions/{version}/config"} <= {
        op.label for op in operations}
    for operation in operations:
        known = {k: v for k, v in served.items() if "{" + k + "}" in operation.path}
        cases = strategies.one_of(*(operation.as_strategy(mode) for mode in modes),
                                  *(operation.as_strategy(mode, path_parameters=known) for mode in modes if known))

        @hypothesis.settings(max_examples=EXAMPLES[operation.method.upper()], deadline=None, database=None,
                             derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=cases)
        def fuzz(case: Any) -> None:
            case.call_and_validate(timeout=TIMEOUT, checks=validations)

        fuzz()


def test_ready_and_serving_after_the_fuzzing(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT, trust_env=False) as c:
        assert c.get("/readyz").json() == {"status": "ready"}
        assert c.get("/v2/health/ready").status_code == 200
        r = c.post("/segment", params={"score_threshold": 0.99}, content=encode(scene(50).image),
                   headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
    assert server.pipeline.batcher.admitted == 0
