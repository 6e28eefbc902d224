"""TLS and SASL settings of the Kafka clients: ``queues.kafka.security`` turned into
kafka-python keyword arguments, with the secrets read from the environment.

Every KafkaConsumer/KafkaProducer fleet builds for the intake takes its security
arguments from ``kafka_security_kwargs``, so the consumer, the dead-letter producer and
the results producer always connect the same way. It runs in the process that opens the
clients (an intake actor on a Ray node): that is where the password variables must be
set. The secret values go only into the returned mapping, never into an error message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from fleet.spec.queues import KafkaSecuritySpec

_SPEC_PATH = "queues.kafka.security"


class KafkaSecurityError(RuntimeError):
    """The security settings cannot be applied in this process: a password variable is
    unset or a TLS file is missing. The message names the variable or file, never a
    secret."""


def kafka_security_kwargs(
    security: KafkaSecuritySpec,
    environ: Mapping[str, str] = os.environ,
    is_file: Callable[[str], bool] = os.path.isfile,
) -> dict[str, Any]:
    """kafka-python keyword arguments (``security_protocol``, ``sasl_*``, ``ssl_*``) for
    ``security``, to pass to KafkaConsumer and KafkaProducer alike.

    ``password_env``/``ssl_password_env`` are looked up in ``environ``; the TLS files are
    checked with ``is_file`` here, because kafka-python would only report a missing one
    as a failure to bootstrap. Raises KafkaSecurityError naming what is missing. For
    ``PLAINTEXT`` (the default) only ``security_protocol`` is set: kafka-python's own
    defaults, i.e. the behaviour of a spec without a ``security`` section.
    """
    out: dict[str, Any] = {"security_protocol": security.protocol.value}
    if security.uses_sasl:
        # Guaranteed by KafkaSecuritySpec for the SASL protocols.
        assert security.sasl_mechanism is not None and security.password_env is not None
        out["sasl_mechanism"] = security.sasl_mechanism.value
        out["sasl_plain_username"] = security.username
        out["sasl_plain_password"] = _secret(environ, security.password_env, "password_env")
    if security.uses_tls:
        out["ssl_check_hostname"] = security.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(security, name)
            if path is None:
                continue
            if not is_file(path):
                raise KafkaSecurityError(
                    f"{_SPEC_PATH}.{name}: {path!r} is not a file on this node "
                    f"(pid {os.getpid()}); it must exist where the Kafka intake runs"
                )
            out[name] = path
        if security.ssl_password_env is not None:
            out["ssl_password"] = _secret(
                environ, security.ssl_password_env, "ssl_password_env"
            )
    return out


def _secret(environ: Mapping[str, str], variable: str, field: str) -> str:
    value = environ.get(variable)
    if not value:
        raise KafkaSecurityError(
            f"{_SPEC_PATH}.{field}: environment variable {variable!r} is "
            f"{'empty' if value == '' else 'not set'} in this process (pid {os.getpid()}); "
            "it must hold the secret wherever the Kafka intake runs (the Ray nodes)"
        )
    return value


__all__ = ["KafkaSecurityError", "kafka_security_kwargs"]
