"""The HTTP ingress is never reachable beyond loopback without authentication, and Ray's
own token authentication stays on, in every shipped deployment file. Offline, no Ray.

Every Serve config (serve_configs/ and the one inside the RayService) is checked with
the rule fleet applies when it starts (``fleet.spec.ingress.check_exposure``), on the
listen address Serve would really use (its default is ``0.0.0.0``). The KubeRay Pods that
may run an ingress replica must read the keys from the mounted Secret, at the path the
spec resolves to (``ingress.auth.keys_file``, else ``$FLEET_KEYS_FILE``). Each check is a
function returning its findings, so the tests below can show it catches a broken file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from fleet.serve_app import APP_IMPORT_PATH, resolve_spec
from fleet.spec import FleetSpec
from fleet.spec.ingress import (
    KEYS_FILE_ENV,
    AuthMode,
    AuthSpec,
    ExposureError,
    check_exposure,
    is_loopback,
)

REPO = Path(__file__).resolve().parents[2]
KUBERAY = sorted((REPO / "kuberay").glob("*.yaml"))
SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))
KEYS_SECRET = "fleet-keys"  # the Secret kuberay/README.md tells users to create
KEYS_SECRET_ENTRY = "keys.json"
RAY_AUTH_ENV = "RAY_AUTH_MODE"
RAY_CLUSTER_KINDS = {"RayCluster", "RayService", "RayJob"}
_RAY_AUTH_IN_TEXT = re.compile(rf"\b{RAY_AUTH_ENV}\s*=\s*['\"]?(\w+)")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}:{d['kind']}", d) for p in KUBERAY for d in _docs(p)]


def _kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _kuberay_docs() if d["kind"] == kind]
    return doc


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec


def _serve_configs() -> list[tuple[str, dict[str, Any]]]:
    """Every shipped Serve config: serve_configs/*.yaml and each RayService's."""
    shipped = [
        (f"serve_configs/{p.name}", yaml.safe_load(p.read_text())) for p in SERVE_CONFIGS
    ]
    embedded = [
        (f"kuberay/{name}.serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"]))
        for name, doc in _kuberay_docs()
        if doc["kind"] == "RayService"
    ]
    return shipped + embedded


def _listen_host(config: dict[str, Any]) -> str:
    # Through Serve's schema: a config without http_options.host listens on 0.0.0.0.
    return ServeDeploySchema.model_validate(config).http_options.host


def _fleet_specs(name: str, config: dict[str, Any]) -> list[FleetSpec]:
    """The fleet spec of every fleet application in a Serve config."""
    return [
        resolve_spec(a["args"]["spec"], f"{name}: applications[{i}].args.spec")
        for i, a in enumerate(config["applications"])
        if a["import_path"] == APP_IMPORT_PATH
    ]


def exposure_errors(name: str, config: dict[str, Any]) -> list[str]:
    """Why a Serve config would serve an unauthenticated ingress beyond loopback."""
    host = _listen_host(config)
    errors = []
    for spec in _fleet_specs(name, config):
        try:
            check_exposure(spec.ingress.auth, host, f"{name}: http_options.host")
        except ExposureError as exc:
            errors.append(str(exc))
    return errors


def keys_mount_errors(doc: dict[str, Any], auth: AuthSpec) -> list[str]:
    """Why a Pod of a KubeRay cluster would not read the ingress's keys from the Secret.

    Every container of the head and worker groups may run an ingress replica (it asks
    for no CPU). The key file it reads (``auth.keys_file``, else ``$FLEET_KEYS_FILE`` of
    the container) must lie in a read-only mount of the whole Secret: a ``subPath``
    mount is never refreshed, so a revoked key would stay valid until a restart.
    """
    cluster = _cluster_spec(doc)
    errors = []
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            where = f"{group.get('groupName', 'head')}/{c['name']}"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            raw = auth.keys_file or env.get(KEYS_FILE_ENV)
            if not raw:
                errors.append(f"{where}: neither ingress.auth.keys_file nor {KEYS_FILE_ENV}")
                continue
            path = PurePosixPath(raw)
            mounts = [
                m for m in c.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])
            ]
            if not mounts:
                errors.append(f"{where}: {path} is in no volume mount")
                continue
            mount = max(mounts, key=lambda m: len(m["mountPath"]))  # the innermost wins
            secret = volumes.get(mount["name"], {}).get("secret")
            if secret is None or secret.get("secretName") != KEYS_SECRET:
                errors.append(f"{where}: {path} is not in a mount of Secret {KEYS_SECRET}")
                continue
            if mount.get("readOnly") is not True:
                errors.append(f"{where}: the keys mount is not readOnly")
            if "subPath" in mount or "subPathExpr" in mount:
                errors.append(f"{where}: a subPath mount never sees the Secret's updates")
            if secret.get("optional"):
                errors.append(f"{where}: an optional Secret starts the ingress without keys")
            rel = str(path.relative_to(mount["mountPath"]))
            files = {i["path"]: i["key"] for i in secret.get("items", [])} or {
                KEYS_SECRET_ENTRY: KEYS_SECRET_ENTRY
            }
            if files.get(rel) != KEYS_SECRET_ENTRY:
                errors.append(f"{where}: {path} is not the Secret's {KEYS_SECRET_ENTRY}")
    return errors


def _ray_auth_settings(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every place a document sets Ray's auth mode, as ``(where, mode)``: container env,
    runtime_env env_vars, ``VAR=value`` in a command line, KubeRay's authOptions, and
    the same inside an embedded Serve config."""
    if isinstance(node, dict):
        if node.get("name") == RAY_AUTH_ENV and "value" in node:
            yield where, str(node["value"])
        for k, v in node.items():
            if k == RAY_AUTH_ENV:
                yield f"{where}.{k}", str(v)
            elif k == "authOptions":
                yield f"{where}.{k}", str((v or {}).get("mode", "disabled"))
            elif k == "serveConfigV2" and isinstance(v, str):
                yield from _ray_auth_settings(yaml.safe_load(v), f"{where}.{k}")
            else:
                yield from _ray_auth_settings(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _ray_auth_settings(v, f"{where}[{i}]")
    elif isinstance(node, str):
        for m in _RAY_AUTH_IN_TEXT.finditer(node):
            yield where, m.group(1)


def ray_auth_errors(name: str, doc: Any) -> list[str]:
    """Where a deployment file turns Ray's token authentication off."""
    return [
        f"{name}{where}: Ray auth mode {mode!r}"
        for where, mode in _ray_auth_settings(doc)
        if mode.lower() == "disabled"
    ]


# -- check_exposure itself ---------------------------------------------------------------

EXPOSED = ["0.0.0.0", "::", "192.168.1.20", "10.0.0.7", "fe80::1", "fleet.example.com"]
LOOPBACK = ["127.0.0.1", "127.0.0.2", "::1", "localhost"]


@pytest.mark.parametrize("host", EXPOSED)
def test_no_auth_is_refused_beyond_loopback(host):
    assert not is_loopback(host)
    with pytest.raises(ExposureError, match=r"^demo\.yaml: "):
        check_exposure(AuthSpec(mode=AuthMode.NONE), host, "demo.yaml")


@pytest.mark.parametrize("host", LOOPBACK)
def test_no_auth_is_allowed_on_loopback(host):
    assert is_loopback(host)
    check_exposure(AuthSpec(mode=AuthMode.NONE), host)


@pytest.mark.parametrize("host", EXPOSED + LOOPBACK)
def test_keys_are_allowed_anywhere(host):
    check_exposure(AuthSpec(), host)
    check_exposure(AuthSpec(mode=AuthMode.KEYS), host)


# -- the shipped files --------------------------------------------------------------------


SHIPPED_SERVE_CONFIGS = _serve_configs()
SHIPPED_DOCS = _kuberay_docs() + SHIPPED_SERVE_CONFIGS


@pytest.mark.parametrize(
    "name, config", SHIPPED_SERVE_CONFIGS, ids=[n for n, _ in SHIPPED_SERVE_CONFIGS]
)
def test_no_shipped_serve_config_exposes_an_unauthenticated_ingress(name, config):
    assert _fleet_specs(name, config), f"{name} has no fleet application"
    assert exposure_errors(name, config) == []


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_listen_on_loopback_only(path):
    config = yaml.safe_load(path.read_text())
    assert is_loopback(_listen_host(config)), path.name


def test_the_rayservice_ingress_is_exposed_and_so_has_auth_on():
    # The case the exposure check exists for: reachable through the serve Service.
    ((name, config),) = [(n, c) for n, c in SHIPPED_SERVE_CONFIGS if "serveConfigV2" in n]
    assert not is_loopback(_listen_host(config))
    for spec in _fleet_specs(name, config):
        assert spec.ingress.auth.mode is AuthMode.KEYS


def test_the_rayservice_pods_read_the_keys_from_the_secret():
    doc = _kind("RayService")
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    specs = _fleet_specs("rayservice", config)
    assert specs
    for spec in specs:
        assert keys_mount_errors(doc, spec.ingress.auth) == [], spec.name


def test_the_raycluster_pods_read_the_keys_of_any_shipped_config_from_the_secret():
    # kuberay/README.md deploys serve_configs/ onto the bare RayCluster.
    doc = _kind("RayCluster")
    for name, config in SHIPPED_SERVE_CONFIGS:
        for spec in _fleet_specs(name, config):
            assert keys_mount_errors(doc, spec.ingress.auth) == [], (name, spec.name)


@pytest.mark.parametrize("name, doc", SHIPPED_DOCS, ids=[n for n, _ in SHIPPED_DOCS])
def test_ray_token_auth_stays_on(name, doc):
    assert ray_auth_errors(name, doc) == []


def test_every_kuberay_cluster_sets_ray_token_auth():
    # Every document that makes a Ray cluster; the others (volume claims) make none.
    clusters = [(n, d) for n, d in _kuberay_docs() if d["kind"] in RAY_CLUSTER_KINDS]
    assert {d["kind"] for _, d in clusters} == RAY_CLUSTER_KINDS
    for name, doc in clusters:
        assert _cluster_spec(doc)["authOptions"]["mode"] == "token", name


# -- the checks catch a broken file -------------------------------------------------------


def _edit_embedded(doc: dict[str, Any], edit: Callable[[dict[str, Any]], Any]) -> None:
    """Edit a RayService's Serve config in place (it is a YAML string in the manifest)."""
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    edit(config)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)


def _set_auth(config: dict[str, Any], **auth: Any) -> None:
    config["applications"][0]["args"]["spec"]["ingress"] = {"auth": auth}


def test_auth_mode_none_in_the_rayservice_is_caught():
    doc = _kind("RayService")
    _edit_embedded(doc, lambda c: _set_auth(c, mode="none"))
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (error,) = exposure_errors("rayservice", config)
    assert "'0.0.0.0' is not a loopback address" in error


def test_auth_mode_none_is_caught_on_serves_default_host_only_off_loopback():
    config = yaml.safe_load((REPO / "serve_configs/support.yaml").read_text())
    _set_auth(config, mode="none")
    assert exposure_errors("support", config) == []  # 127.0.0.1: allowed
    del config["http_options"]  # Serve then listens on 0.0.0.0
    assert len(exposure_errors("support", config)) == 1


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda pod, c: c.pop("env"), f"neither ingress.auth.keys_file nor {KEYS_FILE_ENV}"),
        (lambda pod, c: c["env"][0].update(value="/home/ray/keys.json"), "in no volume mount"),
        (lambda pod, c: c["volumeMounts"][0].pop("readOnly"), "not readOnly"),
        (lambda pod, c: c["volumeMounts"][0].update(subPath="keys.json"), "subPath"),
        (lambda pod, c: pod["volumes"][0]["secret"].update(optional=True), "optional"),
        (lambda pod, c: pod["volumes"][0]["secret"].update(secretName="x"), "not in a mount"),
        (
            lambda pod, c: pod["volumes"][0]["secret"].update(
                items=[{"key": "k", "path": "k"}]
            ),
            f"not the Secret's {KEYS_SECRET_ENTRY}",
        ),
    ],
)
@pytest.mark.parametrize("group", ["head", "worker"])
def test_a_broken_keys_mount_is_caught(group, break_it, expected):
    doc = _kind("RayService")  # read afresh: edits stay in this test
    cluster = _cluster_spec(doc)
    pod = (cluster["headGroupSpec"] if group == "head" else cluster["workerGroupSpecs"][0])[
        "template"
    ]["spec"]
    break_it(pod, pod["containers"][0])
    errors = keys_mount_errors(doc, AuthSpec())
    assert len(errors) == 1 and expected in errors[0], errors


def test_a_keys_file_in_the_spec_outside_the_secret_is_caught():
    # ingress.auth.keys_file wins over $FLEET_KEYS_FILE: the mount must follow it.
    doc = _kind("RayService")
    assert keys_mount_errors(doc, AuthSpec(keys_file="/home/ray/keys.json"))
    assert keys_mount_errors(doc, AuthSpec(keys_file="/etc/fleet/keys/keys.json")) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0][
            "env"
        ].append({"name": RAY_AUTH_ENV, "value": "disabled"}),
        lambda d: _cluster_spec(d)["authOptions"].update(mode="disabled"),
        lambda d: _edit_embedded(
            d,
            lambda c: c["applications"][0].update(
                runtime_env={"env_vars": {RAY_AUTH_ENV: "disabled"}}
            ),
        ),
        lambda d: d["spec"].update(entrypoint=f"{RAY_AUTH_ENV}=disabled python jobs/load.py"),
    ],
    ids=["container-env", "authOptions", "runtime_env", "entrypoint"],
)
def test_ray_auth_disabled_is_caught(mutate):
    doc = _kind("RayService")
    assert ray_auth_errors("rayservice", doc) == []
    mutate(doc)  # the entrypoint is a RayJob's field: any string is scanned the same way
    assert len(ray_auth_errors("rayservice", doc)) == 1
