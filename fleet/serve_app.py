"""Serve application builder for a whole fleet, usable from a Ray Serve config file.

A Serve config names one application per fleet::

    applications:
      - name: shop
        route_prefix: /
        import_path: fleet.serve_app:app
        args: {spec: fleet/examples/demo.yaml}     # a path, or the spec inline as a mapping

``serve run``/``serve deploy`` (and KubeRay's RayService) build that application by
calling ``app(args)`` in a Ray task. The builder brings the fleet up if it is not
running: the ledger, queue shards, controller and dispatcher as *detached* named actors
(they must outlive the build task), and one Serve app of hosts per pool, exactly as
``fleet.runtime.deploy.deploy`` does for ``fleet run --detach``. It then returns the
HTTP ingress (``fleet.ingress``), which Serve deploys as the config's application.

Why the pools are not listed in the config: the dispatcher needs every pool's Serve app
to exist before it starts, and Serve builds a config's applications concurrently and in
no set order. Building them from one builder keeps the order deploy() relies on, and
keeps the spec the only source of the pools' Serve options (``host_deployment_options``).

Rebuilding (a config re-applied, ``serve run`` again after a shutdown) reuses a running
fleet if its spec is the same, and redeploys any pool app that went missing; a running
fleet with a *different* spec is an error, never a silent mix of two specs. The fleet's
actors are detached, so ``serve shutdown`` does not stop them (queued work survives);
``teardown(spec)`` does.

``check_serve_config`` validates a Serve config strictly, offline: Ray Serve's own
schema with unknown fields rejected at every level (Serve itself ignores them), every
``autoscaling_config`` and ``request_router_config`` against Serve's models, and, for
fleet apps, the builder's arguments and the fleet spec they name.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError

from fleet.ingress import DEFAULT_RETRY_AFTER_S, DEFAULT_SUBMIT_WAIT_S, INGRESS_DEPLOYMENT
from fleet.runtime.names import Names
from fleet.spec import FleetSpec, SpecError, load_spec, parse_spec
from fleet.spec._base import SpecModel

APP_IMPORT_PATH = "fleet.serve_app:app"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class AppArgs(SpecModel):
    """The ``args`` of a fleet application in a Serve config."""

    spec: str | dict[str, Any]
    """A fleet spec: a YAML path (absolute, relative to the working directory, or
    relative to the directory holding the ``fleet`` package, e.g.
    ``fleet/examples/demo.yaml``), or the spec itself as a mapping."""
    submit_wait_s: float = Field(default=DEFAULT_SUBMIT_WAIT_S, ge=0)
    """How long an HTTP submit waits for room in a full queue before answering 429."""
    retry_after_s: int = Field(default=DEFAULT_RETRY_AFTER_S, ge=1)
    """The ``Retry-After`` (seconds) sent with a 429."""


class FleetMismatch(RuntimeError):
    """A fleet of the same name runs with another spec, or only partly."""


def resolve_spec(ref: str | dict[str, Any], where: str = "args.spec") -> FleetSpec:
    """Load the spec an ``AppArgs.spec`` names (SpecError with field paths if invalid)."""
    if isinstance(ref, dict):
        return parse_spec(ref, f"<{where}>")
    path = Path(ref)
    candidates = (
        [path]
        if path.is_absolute()
        else list(dict.fromkeys([Path.cwd() / path, _PACKAGE_ROOT / path]))
    )
    for c in candidates:
        if c.is_file():
            return load_spec(c)
    raise SpecError(
        ref, [(where, "no such file; looked in " + ", ".join(str(c) for c in candidates))]
    )


def _fleet_actor_names(spec: FleetSpec) -> list[str]:
    return Names(spec.name).control_actors(spec)


def ensure_fleet(spec: FleetSpec) -> str:
    """Bring the fleet up unless it runs; returns ``deployed``, ``running`` or ``restored``.

    Needs a connected Ray. Raises FleetMismatch if a fleet of that name runs with a
    different spec, or with some of its actors missing.
    """
    import ray
    from ray import serve

    from fleet.runtime.deploy import deploy, deploy_pool, teardown

    names = Names(spec.name)
    ns = spec.namespace
    present = {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == ns
    }
    wanted = _fleet_actor_names(spec)
    if not present.intersection(wanted):
        try:
            deploy(spec, detached=True)
        except BaseException:
            teardown(spec)  # a half-built fleet holds no accepted work yet: start clean
            raise
        return "deployed"
    missing = [n for n in wanted if n not in present]
    if missing:
        raise FleetMismatch(
            f"fleet {spec.name!r} in namespace {ns!r} runs only partly (missing "
            f"{', '.join(missing)}); stop it with fleet.serve_app.teardown(spec) and redeploy"
        )
    ctl = ray.get_actor(names.controller, namespace=ns)
    # Compare as this code reads both: a spec dumped by an older fleet lacks fields that
    # have since gained defaults, and is still the same spec.
    try:
        running = FleetSpec.model_validate(ray.get(ctl.status.remote())["spec"])
    except ValidationError:
        running = None
    if running is None or running.model_dump(mode="json") != spec.model_dump(mode="json"):
        raise FleetMismatch(
            f"fleet {spec.name!r} in namespace {ns!r} already runs with a different spec; "
            "stop it with fleet.serve_app.teardown(spec) first, or give this one another "
            "name or namespace"
        )
    apps = serve.status().applications
    restored = False
    for pool in spec.pools:
        app = apps.get(names.pool_app(pool.name))
        if app is None or app.status in ("DEPLOY_FAILED", "DELETING"):
            deploy_pool(spec, pool)
            restored = True
    return "restored" if restored else "running"


def app(args: dict[str, Any]) -> Any:
    """Serve application builder: the fleet's HTTP ingress, with the fleet brought up.

    ``args`` is ``AppArgs`` as a mapping (what a Serve config's ``args`` holds).
    """
    import ray

    from fleet.ingress import Ingress
    from fleet.runtime.client import init_ray
    from fleet.runtime.deploy import start_serve

    try:
        parsed = AppArgs.model_validate(args)
    except ValidationError as exc:
        errors = [
            (".".join(str(p) for p in e["loc"]) or "<args>", e["msg"]) for e in exc.errors()
        ]
        raise SpecError("<serve config args>", errors) from None
    spec = resolve_spec(parsed.spec)
    if not ray.is_initialized():
        # `serve run fleet.serve_app:app spec=...` calls the builder before it connects.
        init_ray(os.environ.get("RAY_ADDRESS"), log_format=spec.observability.log_format)
    # Under a config, Serve already runs with the config's proxy options and this is a
    # no-op. Otherwise Serve starts here, before deploy() would start it without a
    # proxy, so the ingress is reachable: on 127.0.0.1 only.
    start_serve(http=True)
    ensure_fleet(spec)
    return Ingress.bind(spec.name, spec.namespace, parsed.submit_wait_s, parsed.retry_after_s)


def teardown(spec_ref: str | dict[str, Any] | FleetSpec) -> None:
    """Stop a fleet the builder started: its actors and pool apps (the ingress app is
    Serve's to delete, e.g. ``serve delete <app>`` or ``serve shutdown``)."""
    from fleet.runtime.deploy import teardown as _teardown

    spec = spec_ref if isinstance(spec_ref, FleetSpec) else resolve_spec(spec_ref)
    _teardown(spec)


# -- offline validation of Serve configs ----------------------------------------------


def _model_branch(args: tuple[Any, ...]) -> type[BaseModel] | None:
    return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _check_value(annotation: Any, value: Any, path: str, errors: list[str]) -> None:
    origin = get_origin(annotation)
    if origin is Annotated:
        _check_value(get_args(annotation)[0], value, path, errors)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if isinstance(value, dict):
            _check_model(annotation, value, path, errors, validate=False)
    elif origin in (Union, types.UnionType):
        branches = get_args(annotation)
        model = _model_branch(branches)
        if isinstance(value, dict) and model is not None:
            # Serve types some sections as ``Union[Dict, Model]`` (autoscaling_config,
            # request_router_config, ...): a dict passes the schema unchecked and is
            # converted later, at deploy time. Check it against the model now.
            loose = any(b is dict or get_origin(b) is dict for b in branches)
            _check_model(model, value, path, errors, validate=loose)
        elif isinstance(value, list):
            seq = next((b for b in branches if get_origin(b) is list), None)
            if seq is not None:
                _check_value(seq, value, path, errors)
    elif origin is list and isinstance(value, list):
        (elem,) = get_args(annotation) or (Any,)
        for i, v in enumerate(value):
            _check_value(elem, v, f"{path}[{i}]", errors)
    elif origin is dict and isinstance(value, dict) and len(get_args(annotation)) == 2:
        for k, v in value.items():
            _check_value(get_args(annotation)[1], v, f"{path}.{k}", errors)


def _check_model(
    model: type[BaseModel], data: dict[str, Any], path: str, errors: list[str], validate: bool
) -> None:
    fields = {}
    for name, f in model.model_fields.items():
        fields[name] = f
        if f.alias:
            fields[f.alias] = f
    for key, value in data.items():
        f = fields.get(key)
        where = f"{path}.{key}" if path else str(key)
        if f is None:
            errors.append(f"{where}: unknown field (not in Ray Serve's {model.__name__})")
        else:
            _check_value(f.annotation, value, where, errors)
    if validate:
        try:
            model.model_validate(data)
        except ValidationError as exc:
            for e in exc.errors():
                loc = ".".join(str(p) for p in e["loc"])
                errors.append(f"{path}{'.' if path and loc else ''}{loc}: {e['msg']}")
        except Exception as exc:  # Serve's models import the classes they name
            errors.append(f"{path}: {type(exc).__name__}: {exc}")


def check_serve_config(config: Any) -> list[str]:
    """Every problem in a Serve config (multi-app ``ServeDeploySchema``), as ``path: why``.

    Strict where Serve is lenient: unknown fields are errors at every level. An empty
    list means Serve accepts the config and every fleet app in it can be built.
    """
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        return [f"<root>: expected a mapping, got {type(config).__name__}"]
    errors: list[str] = []
    _check_model(ServeDeploySchema, config, "", errors, validate=True)
    for i, application in enumerate(config.get("applications") or []):
        if (
            not isinstance(application, dict)
            or application.get("import_path") != APP_IMPORT_PATH
        ):
            continue
        where = f"applications[{i}]"
        try:
            parsed = AppArgs.model_validate(application.get("args") or {})
            resolve_spec(parsed.spec, "args.spec")
        except ValidationError as exc:
            errors += [
                f"{where}.args.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors()
            ]
        except SpecError as exc:
            errors += [
                f"{where}.args.spec{'' if p == 'args.spec' else '.' + p}: {why}"
                for p, why in exc.errors
            ]
        for k, dep in enumerate(application.get("deployments") or []):
            if isinstance(dep, dict) and dep.get("name") != INGRESS_DEPLOYMENT:
                errors.append(
                    f"{where}.deployments[{k}].name: {dep.get('name')!r} is not a "
                    f"deployment of a fleet app (only {INGRESS_DEPLOYMENT!r})"
                )
    return errors


def main(argv: list[str] | None = None) -> int:
    """``python -m fleet.serve_app CONFIG.yaml...``: check Serve configs, exit 2 if bad."""
    import sys

    import yaml

    bad = 0
    for path in argv if argv is not None else sys.argv[1:]:
        with open(path, encoding="utf-8") as fh:
            problems = check_serve_config(yaml.safe_load(fh))
        for p in problems:
            print(f"{path}: {p}", file=sys.stderr)
        bad += bool(problems)
    return 2 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
