"""Pool section: one pool of agents per capability, hosted as a Ray Serve deployment."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from fleet.spec._base import SpecModel
from fleet.spec.admission import AdmissionSpec
from fleet.spec.autoscaling import AutoscalingSpec
from fleet.spec.degrade import DegradeSpec
from fleet.spec.llm import LLMSpec
from fleet.spec.preemption import PreemptionSpec
from fleet.spec.routing import RoutingSpec

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lower-case letters, digits, '-' or '_', "
            "starting with a letter, at most 63 characters"
        )
    return value


def _check_import_path(value: str) -> str:
    if not _IMPORT_PATH_RE.match(value):
        raise ValueError(f"{value!r} is not an import path like 'package.module:ClassName'")
    return value


DEFAULT_HOST_DRAIN_TIMEOUT_S = 30.0

Name = Annotated[str, AfterValidator(_check_name)]
ImportPath = Annotated[str, AfterValidator(_check_import_path)]


# The fields of Ray's runtime_env (ray.runtime_env.RuntimeEnv) a pool may set.
RUNTIME_ENV_KEYS = frozenset(
    {
        "pip",
        "uv",
        "conda",
        "env_vars",
        "working_dir",
        "py_modules",
        "py_executable",
        "excludes",
        "config",
        "image_uri",
        "nsight",
    }
)


class PoolSpec(SpecModel):
    """A population of logical agents that serve one capability.

    Hosts (Serve replicas) each run up to ``agents_per_host`` logical agents, and each
    agent works on up to ``concurrency_per_agent`` tasks at once.
    """

    name: Name
    capability: Name
    agent_class: ImportPath
    agent_kwargs: dict[str, Any] = Field(default_factory=dict)
    agents_per_host: int = Field(default=100, ge=1)
    concurrency_per_agent: int = Field(default=1, ge=1)
    cpus_per_host: float = Field(default=0.25, ge=0)
    gpus_per_host: float = Field(default=0.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_hosts_per_node: int | None = Field(default=None, ge=1)
    """At most this many of the pool's hosts on one node (Serve's
    ``max_replicas_per_node``), so that losing a node takes at most that many. Serve
    already spreads a pool's hosts over the nodes where it can; this bounds it. Hosts
    then reserve their CPU/GPU as their own actor resources instead of a one-bundle
    placement group each (Serve allows one or the other), and ``placement_strategy``
    only shapes the start-up probe."""
    placement_timeout_s: float = Field(default=30.0, gt=0)
    """How long deploy waits for the pool's starting hosts to be placeable before it
    fails with ``PoolUnschedulable`` (instead of waiting forever)."""
    host_drain_timeout_s: float = Field(default=DEFAULT_HOST_DRAIN_TIMEOUT_S, gt=0)
    """How long a host that Serve removes (scale-down) may keep finishing the batches it
    holds; it takes no new ones meanwhile. Past it the host is stopped, and the
    dispatcher hands its unfinished batches back to the queue for redelivery."""
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    routing: RoutingSpec = RoutingSpec()
    admission: AdmissionSpec = AdmissionSpec()
    degrade: DegradeSpec | None = None
    llm: LLMSpec | None = None  # the model its agents call as self.llm
    preemption: PreemptionSpec = PreemptionSpec()
    runtime_env: dict[str, Any] | None = None
    """Ray's runtime environment for the pool's hosts (``pip``, ``uv``, ``conda``,
    ``env_vars``, ``working_dir``, ``py_modules``, ...; Ray installs it on the nodes).
    Values of ``env_vars`` whose names look secret (containing ``secret``, ``password``,
    ``token``, ``api_key``, ``credential``, ``private_key``; or the one ``llm.api_key_env``
    names) are redacted from status and logs like such ``agent_kwargs``; better still,
    set secrets on the nodes and name them (``llm.api_key_env``)."""

    @field_validator("runtime_env")
    @classmethod
    def _check_runtime_env(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        unknown = sorted(set(v) - RUNTIME_ENV_KEYS)
        if unknown:
            raise ValueError(
                f"unknown runtime_env field(s) {unknown}; Ray's are {sorted(RUNTIME_ENV_KEYS)}"
            )
        env = v.get("env_vars")
        if env is not None and not (
            isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(x, str) for k, x in env.items())
        ):
            raise ValueError("runtime_env.env_vars must map names to strings")
        return v

    @property
    def host_bundle(self) -> dict[str, float]:
        """Resources one host reserves (a placement-group bundle); empty if none."""
        bundle = {"CPU": self.cpus_per_host, "GPU": self.gpus_per_host}
        return {k: v for k, v in bundle.items() if v > 0}

    @property
    def max_hosts(self) -> int:
        return -(-self.autoscaling.max_agents // self.agents_per_host)

    def hosts_for(self, agents: int) -> int:
        """Hosts needed to run ``agents`` logical agents (at least one)."""
        return max(1, -(-agents // self.agents_per_host))
