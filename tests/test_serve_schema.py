"""schemathesis against the server's own OpenAPI document: no generated request gets a 5xx.

    .venv/bin/python -m pytest tests/test_serve_schema.py -q

The server runs with the think model and its context cut to 96 tokens, so every admitted generation
is short whatever `max_tokens` hypothesis picks (the prompt + max_tokens check rejects the rest).
Valid (positive) and invalid (negative) requests are generated for every operation; each response
must be < 500. schemathesis' pytest plugin does not load under pytest 9, so the strategies are
driven with hypothesis directly.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from tifaforge.serve.app import create_app
from test_serve import KEY, live
from test_serve import think_dir  # noqa: F401  (fixture)

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api_url(think_dir):  # noqa: F811
    from tifaforge.engine.generate import Engine

    engine = Engine.load(think_dir, device="cpu")
    engine.context = 96
    with live(create_app(engine, api_key=KEY, max_concurrency=4)) as base:
        yield base


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_url, mode):
    schema = schemathesis.openapi.from_url(api_url + "/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    seen = []

    for op in operations:
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            response = case.call(base_url=api_url, headers=AUTH, timeout=120)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.path, case.body, response.text)

        call()
    assert seen and (200 in seen if mode == GenerationMode.POSITIVE else 400 in seen)
