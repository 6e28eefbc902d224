"""Property-based tests of the HTTP ingress from its own OpenAPI schema (schemathesis).

One fleet (no-op agents) and its ingress, authentication on. For every operation of the
schema the ingress serves (which enumerates the fleet's capabilities):

- inputs the schema allows, sent with a valid key: never a 5xx, every response as the
  schema declares it (status and body), and never refused as invalid by validation (a
  422 for a schema-valid task must be fleet's own ``task_rejected``, a judgement the
  schema cannot express, such as a deadline already past);
- inputs that violate the schema, with a valid key: refused with a 4xx, never accepted;
- without a key: 401 on every protected route, whatever the input.

Bounded: ``EXAMPLES`` cases per operation and mode, derandomized (the same cases every
run), no example database.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import schemathesis

from fleet.security.keys import KeyFile
from tests.security._live import ingress_fleet
from tests.utils import make_spec, pool

pytestmark = pytest.mark.ray

EXAMPLES = 12
PUBLIC = {("GET", "/healthz")}


@pytest.fixture(scope="module")
def fuzz(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = KeyFile(tmp / "keys.json")
    key, _ = keys.create("fuzz", ["submit", "read", "admin"])
    spec = make_spec(
        pool("alpha", agents_per_host=2, cpus_per_host=0),
        pool("beta", agents_per_host=2, cpus_per_host=0),
        name="fuzz",
        namespace="fleet-test-fuzz",
        queues={"shards": 1},
        ingress={
            "auth": {"keys_file": str(tmp / "keys.json")},
            "limits": {"tenant_requests_per_s": 10_000, "tenant_burst": 10_000},
        },
    )
    with ingress_fleet(spec, "/fuzz") as (_fc, url):
        auth = {"Authorization": f"Bearer {key}"}
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth, timeout=30)
        yield SimpleNamespace(url=url, auth=auth, schema=schema)


def _operations(schema: Any) -> list[Any]:
    return [r.ok() for r in schema.get_all_operations()]


def _each_case(operation: Any, mode: Any, check: Any) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        check(case)

    run()


def test_the_schema_enumerates_capabilities_and_declares_bearer_auth(fuzz):
    raw = fuzz.schema.raw_schema
    task = raw["components"]["schemas"]["Task"]["properties"]["capability"]
    assert task["enum"] == ["alpha", "beta"]
    assert raw["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ops = {(o.method.upper(), o.path) for o in _operations(fuzz.schema)}
    assert {
        ("POST", "/tasks"),
        ("GET", "/tasks"),
        ("GET", "/tasks/{task_id}"),
        ("DELETE", "/tasks/{task_id}"),
    } <= ops


def test_valid_inputs_get_declared_answers_and_are_never_refused_by_validation(fuzz):
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        response_schema_conformance,
        status_code_conformance,
    )

    seen: dict[str, set[int]] = {}

    def check(case: Any) -> None:
        r = case.call_and_validate(
            base_url=fuzz.url,
            headers=fuzz.auth,
            checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            timeout=60,
        )
        seen.setdefault(f"{case.method} {case.path}", set()).add(r.status_code)
        if r.status_code == 422:
            kinds = {e.get("type") for e in r.json()["detail"]}
            # fleet's judgements only: a task it will not run (a deadline already past),
            # a listing cursor it never gave (opaque to the schema)
            assert kinds <= {"task_rejected", "cursor_rejected"}, (case.body, r.text)

    for op in _operations(fuzz.schema):
        _each_case(op, GenerationMode.POSITIVE, check)
    assert 202 in seen["POST /tasks"] or 200 in seen["POST /tasks"], seen
    assert seen["GET /healthz"] == {200}, seen


def test_invalid_inputs_are_refused_and_nothing_is_accepted(fuzz):
    from schemathesis.core.parameters import ParameterLocation
    from schemathesis.generation import GenerationMode

    bad: list[tuple[str, Any, int]] = []
    inputs = {ParameterLocation.BODY, ParameterLocation.PATH, ParameterLocation.QUERY}
    sent = 0

    def check(case: Any) -> None:
        nonlocal sent
        negated = {
            loc
            for loc, info in case.meta.components.items()
            if info.mode is GenerationMode.NEGATIVE
        }
        if not negated & inputs:
            return  # only a header was made invalid (the key), and the key is ours to send
        sent += 1
        r = case.call(base_url=fuzz.url, headers=fuzz.auth, timeout=60)
        if not 400 <= r.status_code < 500:
            bad.append((case.as_curl_command(), repr(case.meta), r.status_code))

    tried = []
    for op in _operations(fuzz.schema):
        raw = op.definition.raw
        if not (raw.get("parameters") or raw.get("requestBody")):
            continue  # no input to get wrong (/healthz, /status, /metrics)
        tried.append(f"{op.method.upper()} {op.path}")
        _each_case(op, GenerationMode.NEGATIVE, check)
    assert sorted(tried) == [
        "DELETE /tasks/{task_id}",
        "GET /tasks",
        "GET /tasks/{task_id}",
        "POST /tasks",
    ]
    assert sent >= EXAMPLES, sent  # most cases break the body, path or query
    assert bad == [], bad[:10]


def test_without_a_key_every_protected_route_is_401(fuzz):
    from schemathesis.generation import GenerationMode

    codes: dict[str, set[int]] = {}

    def check(case: Any) -> None:
        r = case.call(base_url=fuzz.url, headers={"Authorization": ""}, timeout=60)
        codes.setdefault(f"{case.method} {case.path}", set()).add(r.status_code)

    for op in _operations(fuzz.schema):
        if (op.method.upper(), op.path) in PUBLIC:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _each_case(op, mode, check)
    assert codes and all(c == {401} for c in codes.values()), codes


@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b'{"capability": "alpha", "id": "\xff\xfe"}', 400, "parsing the body"),  # bad UTF-8
        (b"[" * 100_000, 400, "parsing the body"),  # nesting deeper than any parser goes
        (b'{"capability": "alpha", "id": "n1", "utility": NaN}', 422, "finite"),
        (b'{"capability": "alpha", "id": "n2", "deadline_unix_s": Infinity}', 422, "finite"),
        (b'{"capability": "alpha", "id": "n3", "utility": false}', 422, "valid number"),
        (b'{"capability": "alpha", "id": "n4", "priority": 1' + b"0" * 5000 + b"}", 400, ""),
        (b'{"capability": "alpha", "id": "n5", "priority": "5"}', 422, "valid integer"),
        (b'{"capability": "gamma", "id": "n6"}', 422, "unknown capability"),
        (b'{"capability": "alpha", "id": "n7", "extra": 1}', 422, "extra"),
    ],
)
def test_malformed_input_is_a_4xx_naming_the_problem_and_queues_nothing(
    fuzz, body, status, needle
):
    import httpx

    headers = {**fuzz.auth, "content-type": "application/json"}
    r = httpx.post(f"{fuzz.url}/tasks", content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.text
    for task_id in ("n1", "n2", "n3", "n4", "n5", "n6", "n7"):
        got = httpx.get(f"{fuzz.url}/tasks/{task_id}", headers=fuzz.auth, timeout=30)
        assert got.status_code == 404, (task_id, got.text)


def test_a_header_of_any_size_is_not_a_5xx(fuzz):
    import httpx

    for size in (100, 10_000, 200_000):
        headers = {**fuzz.auth, "x-big": "a" * size}
        try:
            r = httpx.get(f"{fuzz.url}/tasks/x", headers=headers, timeout=30)
        except httpx.RemoteProtocolError:
            continue  # the server closed the connection on an oversized header: fine
        assert r.status_code < 500, (size, r.status_code)
