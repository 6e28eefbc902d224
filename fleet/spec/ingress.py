"""Ingress section: who may call the fleet's HTTP ingress, and how much.

``auth`` says how callers prove who they are. ``mode: keys`` (the default): every route
but ``/healthz`` needs ``Authorization: Bearer <key>``; a key names one tenant and its
roles, and is stored only as its SHA-256 digest in a key file (``fleet keys create``
writes one; on Kubernetes it is mounted from a Secret). ``mode: none`` turns
authentication off: the ingress then answers anyone who can reach it, so fleet refuses
to expose it beyond loopback (see ``check_exposure``) and warns at start.

``limits`` bound every input: a request body (413), the tasks of one batch, the
requests of one tenant per second across all ingress replicas (429 with
``Retry-After``), and one tenant's concurrent long-polls. A task's payload is bounded by
``queues.max_payload_bytes`` and its output by ``results.max_output_bytes``.
"""

from __future__ import annotations

import ipaddress
import os
from enum import Enum
from pathlib import Path

from pydantic import Field

from fleet.spec._base import SpecModel

KEYS_FILE_ENV = "FLEET_KEYS_FILE"
DEFAULT_KEYS_DIR = Path("~/.fleet/keys")
DEFAULT_RELOAD_S = 2.0
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BATCH_TASKS = 1_000
MAX_BATCH_TASKS = 10_000
DEFAULT_TENANT_REQUESTS_PER_S = 100.0
DEFAULT_TENANT_BURST = 200
DEFAULT_TENANT_LONG_POLLS = 16
DEFAULT_MAX_WAIT_S = 30.0
LOOPBACK_HOSTS = frozenset({"localhost"})


class AuthMode(str, Enum):
    KEYS = "keys"
    NONE = "none"


class AuthSpec(SpecModel):
    """How HTTP callers are authenticated.

    ``keys_file``: the key file (JSON, written by ``fleet keys``). Unset: the
    ``FLEET_KEYS_FILE`` environment variable of the ingress's process, else
    ``~/.fleet/keys/<fleet name>.json``. Every ingress replica re-reads it when it changes
    (checked every ``reload_s``), so a key created or revoked takes effect within a few
    seconds, without a redeploy.
    """

    mode: AuthMode = AuthMode.KEYS
    keys_file: str | None = Field(default=None, min_length=1)
    reload_s: float = Field(default=DEFAULT_RELOAD_S, gt=0, le=60, allow_inf_nan=False)

    def resolved_keys_file(self, fleet: str) -> Path:
        """Where this fleet's keys are read from (see the class docstring)."""
        raw = self.keys_file or os.environ.get(KEYS_FILE_ENV)
        path = Path(raw) if raw else DEFAULT_KEYS_DIR / f"{fleet}.json"
        return path.expanduser()


class LimitsSpec(SpecModel):
    """Bounds on what one request and one tenant may ask of the ingress.

    ``tenant_requests_per_s`` and ``tenant_burst``: a token bucket per tenant, shared by
    every ingress replica (a request over it is refused with 429 and ``Retry-After``).
    ``tenant_long_polls``: concurrent ``GET /tasks/{id}?wait_s=`` of one tenant, per
    ingress replica. ``max_wait_s``: the longest long-poll.
    """

    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    max_batch_tasks: int = Field(default=DEFAULT_MAX_BATCH_TASKS, ge=1, le=MAX_BATCH_TASKS)
    tenant_requests_per_s: float = Field(
        default=DEFAULT_TENANT_REQUESTS_PER_S, gt=0, allow_inf_nan=False
    )
    tenant_burst: int = Field(default=DEFAULT_TENANT_BURST, ge=1)
    tenant_long_polls: int = Field(default=DEFAULT_TENANT_LONG_POLLS, ge=1)
    max_wait_s: float = Field(default=DEFAULT_MAX_WAIT_S, ge=0, le=300, allow_inf_nan=False)


class IngressSpec(SpecModel):
    """The HTTP ingress: authentication and limits (see the module docstring)."""

    auth: AuthSpec = AuthSpec()
    limits: LimitsSpec = LimitsSpec()


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only (an
    IPv4 loopback address written as IPv6, ``::ffff:127.0.0.1``, included)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


class ExposureError(ValueError):
    """An ingress without authentication would listen beyond loopback."""


def check_exposure(auth: AuthSpec, host: str, where: str = "http_options.host") -> None:
    """Refuse to serve an unauthenticated ingress on ``host`` unless it is loopback."""
    if auth.mode is AuthMode.NONE and not is_loopback(host):
        raise ExposureError(
            f"{where}: {host!r} is not a loopback address, and ingress.auth.mode is "
            "'none': anyone who can reach it could submit tasks and read results. "
            "Bind 127.0.0.1, or turn authentication on (ingress.auth.mode: keys) and "
            "create a key with `fleet keys create`."
        )
