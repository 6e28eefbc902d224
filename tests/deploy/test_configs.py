"""Offline checks of the deployment files: kuberay/ against KubeRay v1.7.0's CRDs (and
its PersistentVolumeClaims against a strict schema of their own), every Serve config
(serve_configs/ and the one inside the RayService) against Ray Serve's own schema,
strictly (unknown fields are errors), and the durable storage of the long-lived
clusters: a claim mounted on the head, where the fleet's stateful actors run and its
spec keeps its files. No Ray cluster needed."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from fleet.serve_app import AppArgs, app, check_serve_config, resolve_spec
from fleet.spec import FleetSpec, SpecError
from fleet.spec.queues import STORAGE_NODE_HEAD, StorageBackend
from tests.deploy._schemas import (
    CRD_FILES,
    crd_errors,
    crd_schema,
    manifest_errors,
    pvc_errors,
    strict,
)

REPO = Path(__file__).resolve().parents[2]
KUBERAY = sorted((REPO / "kuberay").glob("*.yaml"))
SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kinds() -> dict[str, dict]:
    """The KubeRay resources of kuberay/, by kind (one of each)."""
    return {d["kind"]: d for p in KUBERAY for d in _docs(p) if d["kind"] in CRD_FILES}


def _claims() -> dict[str, dict]:
    """The PersistentVolumeClaims of kuberay/, by name."""
    return {
        d["metadata"]["name"]: d
        for p in KUBERAY
        for d in _docs(p)
        if d["kind"] == "PersistentVolumeClaim"
    }


def _embedded_serve_config() -> dict:
    return yaml.safe_load(_kinds()["RayService"]["spec"]["serveConfigV2"])


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec


# -- kuberay/ ----------------------------------------------------------------------------


def test_kuberay_has_a_cluster_a_service_and_a_job():
    assert {"RayCluster", "RayService", "RayJob"} <= set(_kinds())


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_kuberay_file_validates_strictly_against_the_crds(path):
    # KubeRay resources against their CRDs, claims against PVC_SCHEMA, anything else fails.
    docs = _docs(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert manifest_errors(doc) == [], f"{path.name} ({doc.get('kind')})"


def test_a_kind_without_a_schema_is_an_error():
    errors = manifest_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}})
    assert errors == ["<root>: not a KubeRay resource: v1 ConfigMap"]


@pytest.mark.parametrize(
    "where",
    [
        ("spec",),
        ("cluster", "autoscalerOptions"),
        ("cluster", "headGroupSpec"),
        ("cluster", "headGroupSpec", "template", "spec", "containers", 0, "resources"),
        ("cluster", "workerGroupSpecs", 0),
    ],
)
@pytest.mark.parametrize("kind", ["RayCluster", "RayService", "RayJob"])
def test_an_injected_unknown_field_is_rejected(kind, where):
    doc = copy.deepcopy(_kinds()[kind])
    node = _cluster_spec(doc) if where[0] == "cluster" else doc["spec"]
    for key in where[1:]:
        node = node[key]
    node["replicsa"] = 3  # a typo Kubernetes would prune without a word
    errors = crd_errors(doc)
    assert len(errors) == 1 and "'replicsa' was unexpected" in errors[0], errors


def test_a_wrong_type_is_rejected_too():
    doc = copy.deepcopy(_kinds()["RayCluster"])
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    assert any("maxReplicas" in e for e in crd_errors(doc))


def test_the_strict_crd_schema_is_a_valid_json_schema():
    # One meta-schema check (seconds per CRD); the three share the RayCluster spec.
    Draft202012Validator.check_schema(crd_schema("RayCluster", "v1"))


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_every_crd_schema_is_closed_at_the_top(kind):
    schema = crd_schema(kind, "v1")
    assert schema["additionalProperties"] is False
    assert schema["properties"]["spec"]["additionalProperties"] is False


def test_strict_schemas_leave_preserve_unknown_fields_open():
    schema = strict(
        {
            "type": "object",
            "properties": {
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
                "open": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"a": {"type": "string"}},
                },
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["closed"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["open"]
    assert schema["properties"]["map"]["additionalProperties"] == {"type": "string"}


def test_the_cluster_autoscaler_is_on_and_token_auth_stays_on():
    assert set(_kinds()) == set(CRD_FILES)
    for kind, doc in _kinds().items():
        cluster = _cluster_spec(doc)
        assert cluster["enableInTreeAutoscaling"] is True, kind
        assert cluster["authOptions"]["mode"] == "token", kind
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                res = c["resources"]
                assert res["requests"] and res["requests"] == res["limits"], (kind, c["name"])


def test_the_rayjob_runs_a_jobs_entrypoint_with_valid_arguments():
    from jobs.load import parse_args

    argv = shlex.split(_kinds()["RayJob"]["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/load.py")
    args = parse_args(argv[2:])
    assert args.tasks == 20_000
    assert resolve_spec(args.spec).name == "demo"


# -- durable storage: a claim on the head, the spec's directory on it ----------------------

# The image's user `ray` (uid 1000) is in group `users` (gid 100): with that fsGroup the
# kubelet makes the volume group-writable for it.
RAY_GID = 100
HEAD_STATE_MOUNT = "/home/ray/fleet-state"
SINGLE_WRITER_MODES = {"ReadWriteOnce", "ReadWriteOncePod"}


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    cluster = _cluster_spec(doc)
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]
    ]


def _claim_mounts(pod: dict) -> list[tuple[str, dict, str]]:
    """(container, mount, claim name) for every mount of a PersistentVolumeClaim."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return [
        (c["name"], m, volumes[m["name"]]["persistentVolumeClaim"]["claimName"])
        for c in pod["containers"]
        for m in c.get("volumeMounts", [])
        if "persistentVolumeClaim" in volumes.get(m["name"], {})
    ]


def state_volume_errors(
    doc: dict, claims: dict[str, dict]
) -> tuple[PurePosixPath | None, list[str]]:
    """Where a long-lived cluster's head mounts the fleet's state volume, and why that
    volume would not hold the state safely.

    The stateful actors run on the head (``queues.storage.node: head``), so the head,
    and only the head, mounts a claim declared in kuberay/, writable by the image's user,
    single-writer (two fleets on one queue would both run it). A RayService must then not
    upgrade by starting a second cluster: its head would want the same volume.
    """
    errors = []
    mount_path = None
    for group, pod in _pod_specs(doc):
        for container, mount, claim in _claim_mounts(pod):
            where = f"{group}/{container}"
            if group != "head":
                errors.append(f"{where}: mounts claim {claim}; only the head writes state")
                continue
            mount_path = PurePosixPath(mount["mountPath"])
            if claim not in claims:
                errors.append(f"{where}: claim {claim} is declared nowhere in kuberay/")
                continue
            modes = set(claims[claim]["spec"]["accessModes"])
            if not modes <= SINGLE_WRITER_MODES:
                errors.append(f"{where}: claim {claim} is not single-writer: {sorted(modes)}")
            if mount.get("readOnly"):
                errors.append(f"{where}: the state volume is mounted readOnly")
            if pod.get("securityContext", {}).get("fsGroup") != RAY_GID:
                errors.append(f"{where}: no fsGroup {RAY_GID}: the ray user cannot write it")
    if mount_path is None:
        errors.append("head: mounts no claim; the fleet's state would die with the Pod")
    elif doc["kind"] == "RayService":
        strategy = doc["spec"].get("upgradeStrategy", {}).get("type", "NewCluster")
        if strategy != "None":
            errors.append(
                f"upgradeStrategy {strategy}: a second cluster's head would want the volume"
            )
    return mount_path, errors


def spec_storage_errors(spec: FleetSpec, mount_path: PurePosixPath) -> list[str]:
    """Why a fleet would not keep its files on the head's volume."""
    storage = spec.queues.storage
    errors = []
    if storage.backend is not StorageBackend.SQLITE:
        errors.append(f"queues.storage.backend is {storage.backend.value}: nothing on disk")
    if storage.node != STORAGE_NODE_HEAD:
        errors.append(f"queues.storage.node is {storage.node!r}, not the head")
    if not PurePosixPath(storage.directory).is_relative_to(mount_path):
        errors.append(f"queues.storage.directory {storage.directory} is not in {mount_path}")
    return errors


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_the_long_lived_clusters_keep_state_on_a_claim_mounted_on_the_head(kind):
    mount_path, errors = state_volume_errors(_kinds()[kind], _claims())
    assert errors == []
    assert str(mount_path) == HEAD_STATE_MOUNT


def test_the_service_and_the_cluster_have_claims_of_their_own():
    # One ReadWriteOnce volume for both would keep whichever head comes second pending.
    heads = [_pod_specs(_kinds()[k])[0][1] for k in ("RayService", "RayCluster")]
    (service,), (cluster,) = ({c for _, _, c in _claim_mounts(pod)} for pod in heads)
    assert service != cluster
    assert set(_claims()) == {service, cluster}, "a claim no cluster mounts"


def test_every_claim_is_a_valid_persistent_volume_claim():
    assert _claims()
    for name, claim in _claims().items():
        assert pvc_errors(claim) == [], name


def test_the_rayservice_fleet_keeps_its_files_on_the_head_volume():
    mount_path, _ = state_volume_errors(_kinds()["RayService"], _claims())
    assert mount_path is not None
    (application,) = _embedded_serve_config()["applications"]
    assert spec_storage_errors(resolve_spec(application["args"]["spec"]), mount_path) == []


def _head(doc: dict) -> dict:
    return _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]


def _worker(doc: dict) -> dict:
    return _cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda d, c: _head(d)["containers"][0]["volumeMounts"].pop(), "mounts no claim"),
        (
            lambda d, c: _head(d)["volumes"][-1]["persistentVolumeClaim"].update(
                claimName="elsewhere"
            ),
            "claim elsewhere is declared nowhere",
        ),
        (
            lambda d, c: c["fleet-service-state"]["spec"].update(
                accessModes=["ReadWriteMany"]
            ),
            "not single-writer",
        ),
        (
            lambda d, c: _head(d)["containers"][0]["volumeMounts"][-1].update(readOnly=True),
            "mounted readOnly",
        ),
        (lambda d, c: _head(d).pop("securityContext"), "no fsGroup 100"),
        (
            lambda d, c: (
                _worker(d)["volumes"].append(_head(d)["volumes"][-1]),
                _worker(d)["containers"][0]["volumeMounts"].append(
                    _head(d)["containers"][0]["volumeMounts"][-1]
                ),
            ),
            "agents/ray-worker: mounts claim fleet-service-state",
        ),
        (lambda d, c: d["spec"].pop("upgradeStrategy"), "upgradeStrategy NewCluster"),
    ],
    ids=["no-mount", "undeclared", "rwx", "read-only", "no-fsgroup", "worker", "upgrade"],
)
def test_a_broken_state_volume_is_caught(break_it, expected):
    doc, claims = _kinds()["RayService"], _claims()  # read afresh: edits stay here
    break_it(doc, claims)
    _, errors = state_volume_errors(doc, claims)
    assert len(errors) == 1 and expected in errors[0], errors


@pytest.mark.parametrize(
    "storage, expected",
    [
        ({"directory": "/home/ray/.fleet/queues"}, "is not in /home/ray/fleet-state"),
        ({"directory": HEAD_STATE_MOUNT, "backend": "memory"}, "backend is memory"),
        ({"directory": HEAD_STATE_MOUNT, "node": "resource:disk"}, "not the head"),
    ],
)
def test_a_spec_storage_off_the_volume_is_caught(storage, expected):
    (application,) = _embedded_serve_config()["applications"]
    application["args"]["spec"]["queues"]["storage"] = storage
    spec = resolve_spec(application["args"]["spec"])
    errors = spec_storage_errors(spec, PurePosixPath(HEAD_STATE_MOUNT))
    assert len(errors) == 1 and expected in errors[0], errors


# -- kuberay/README.md's GCS fault-tolerance snippet ---------------------------------------

README = REPO / "kuberay" / "README.md"
_FENCED_YAML = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def _readme_gcs_ft_snippet() -> dict:
    """The README's optional ``gcsFaultToleranceOptions`` block, as a patch of the
    RayService (``spec.rayClusterConfig.gcsFaultToleranceOptions``)."""
    blocks = [yaml.safe_load(b) for b in _FENCED_YAML.findall(README.read_text())]
    (snippet,) = [
        b
        for b in blocks
        if isinstance(b, dict)
        and "gcsFaultToleranceOptions" in b.get("spec", {}).get("rayClusterConfig", {})
    ]
    return snippet


def _merged(base: Any, patch: Any) -> Any:
    """``base`` with ``patch`` laid over it, mappings merged key by key (a copy)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {
            k: _merged(base.get(k), patch[k]) if k in patch else copy.deepcopy(base[k])
            for k in base.keys() | patch.keys()
        }
    return copy.deepcopy(patch)


def _gcs_ft_options() -> dict:
    return _readme_gcs_ft_snippet()["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]


def test_the_readmes_gcs_fault_tolerance_snippet_validates_in_the_rayservice():
    doc = _merged(_kinds()["RayService"], _readme_gcs_ft_snippet())
    assert crd_errors(doc) == []
    options = doc["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == _gcs_ft_options() and options["redisAddress"]
    # The password comes from a Secret, never written into the manifest.
    assert set(options["redisPassword"]) == {"valueFrom"}
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["key"]


def test_the_same_options_validate_in_the_raycluster():
    doc = _merged(
        _kinds()["RayCluster"], {"spec": {"gcsFaultToleranceOptions": _gcs_ft_options()}}
    )
    assert crd_errors(doc) == []


def test_a_typo_in_the_gcs_fault_tolerance_snippet_is_caught():
    snippet = _readme_gcs_ft_snippet()
    options = snippet["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    options["redisAdress"] = options.pop("redisAddress")
    errors = crd_errors(_merged(_kinds()["RayService"], snippet))
    assert len(errors) == 1 and "'redisAdress' was unexpected" in errors[0], errors


# -- Serve configs ------------------------------------------------------------------------


def test_serve_configs_exist():
    assert {p.name for p in SERVE_CONFIGS} >= {"demo.yaml", "support.yaml", "shop.yaml"}


def test_serves_own_schema_ignores_unknown_fields_so_we_check_strictly():
    # Why check_serve_config exists: ServeDeploySchema accepts (and drops) typos.
    config = yaml.safe_load((REPO / "serve_configs/support.yaml").read_text())
    config["http_option"] = {"host": "0.0.0.0"}
    config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 99
    ServeDeploySchema.model_validate(config)  # Serve itself says nothing
    errors = check_serve_config(config)
    assert any(e.startswith("http_option: unknown field") for e in errors)
    assert any("autoscaling_config.max_replica: unknown field" in e for e in errors)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_every_serve_config_validates_strictly(path):
    config = yaml.safe_load(path.read_text())
    assert check_serve_config(config) == []
    parsed = ServeDeploySchema.model_validate(config)
    assert parsed.http_options.host == "127.0.0.1", "local configs listen on loopback only"
    assert all(a.import_path == "fleet.serve_app:app" for a in parsed.applications)


def test_the_rayservice_embeds_a_valid_serve_config():
    config = _embedded_serve_config()
    assert check_serve_config(config) == []
    ServeDeploySchema.model_validate(config)


def _fleet_spec_of(config: dict) -> dict:
    (a,) = config["applications"]
    return a["args"]["spec"]


def test_the_rayservice_config_is_serve_configs_shop_apart_from_address_and_storage():
    # Two differences only: the proxy listens on the Pod's address, and the fleet keeps
    # its files on the head's volume (checked in full by the storage tests below).
    embedded = _embedded_serve_config()
    shop = yaml.safe_load((REPO / "serve_configs/shop.yaml").read_text())
    assert embedded["http_options"]["host"] == "0.0.0.0"
    storage = _fleet_spec_of(embedded)["queues"].pop("storage")
    assert storage["directory"] == HEAD_STATE_MOUNT
    _fleet_spec_of(shop)["queues"].pop("storage", None)
    for c in (embedded, shop):
        c["http_options"].pop("host")
        c.pop("proxy_location")
    assert embedded == shop


def _all_serve_configs() -> list[tuple[str, dict]]:
    return [(p.name, yaml.safe_load(p.read_text())) for p in SERVE_CONFIGS] + [
        ("rayservice.yaml:serveConfigV2", _embedded_serve_config())
    ]


def test_every_autoscaling_config_is_a_valid_serve_autoscaling_config():
    seen = 0
    known = set(AutoscalingConfig.model_fields)
    for name, config in _all_serve_configs():
        for a in config["applications"]:
            for d in a.get("deployments", []):
                ac = d.get("autoscaling_config")
                if ac is None:
                    continue
                assert set(ac) <= known, (name, set(ac) - known)
                parsed = AutoscalingConfig.model_validate(ac)
                assert parsed.min_replicas <= parsed.max_replicas, name
                seen += 1
    assert seen >= 4


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(bogus=1), "bogus: unknown field"),
        (lambda c: c["applications"][0].update(import_pth="x"), "import_pth: unknown field"),
        (
            lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(
                min_replicas=-1
            ),
            "autoscaling_config.min_replicas: Input should be greater",
        ),
        (
            lambda c: c["applications"][0]["deployments"][0]["ray_actor_options"].update(
                num_gpu=1
            ),
            "ray_actor_options.num_gpu: unknown field",
        ),
        (
            lambda c: c["applications"][0]["deployments"][0].update(
                request_router_config={"request_router_class": "nowhere:Router"}
            ),
            "request_router_config: ModuleNotFoundError",
        ),
        (
            lambda c: c["applications"][0]["deployments"].append({"name": "hosts"}),
            "deployments[1].name: 'hosts' is not a deployment of a fleet app",
        ),
        (
            lambda c: c["applications"][0]["args"].update(submit_wait_s=-1),
            "args.submit_wait_s: Input should be greater than or equal to 0",
        ),
        (
            lambda c: c["applications"][0]["args"]["spec"]["pools"][0]["autoscaling"].update(
                min_agents=500
            ),
            "args.spec.pools.0.autoscaling: min_agents (500) must be <= max_agents (200)",
        ),
        (
            lambda c: c["applications"][0]["args"].update(spec="no/such/spec.yaml"),
            "applications[0].args.spec: no such file",
        ),
    ],
)
def test_check_serve_config_names_what_is_wrong(mutate, expected):
    config = yaml.safe_load((REPO / "serve_configs/support.yaml").read_text())
    mutate(config)
    errors = check_serve_config(config)
    assert any(expected in e for e in errors), errors


# -- the application builder, without a cluster -----------------------------------------


def test_spec_paths_resolve_from_the_package_root_and_inline_specs_parse():
    assert resolve_spec("fleet/examples/demo.yaml").name == "demo"
    inline = yaml.safe_load((REPO / "serve_configs/support.yaml").read_text())
    assert resolve_spec(inline["applications"][0]["args"]["spec"]).pools[0].name == "support"
    with pytest.raises(SpecError, match="no such file; looked in"):
        resolve_spec("fleet/examples/nope.yaml")


def test_builder_rejects_bad_args_with_the_field_before_touching_ray():
    with pytest.raises(SpecError) as exc:
        app({"spec": "fleet/examples/demo.yaml", "retry_after_s": 0})
    assert exc.value.errors[0][0] == "retry_after_s"
    with pytest.raises(SpecError) as exc:
        app(
            {
                "spec": {
                    "pools": [
                        {
                            "name": "p",
                            "capability": "p",
                            "agent_class": "a:B",
                            "autoscaling": {"min_agents": 5, "max_agents": 1},
                        }
                    ]
                }
            }
        )
    assert exc.value.errors[0][0] == "pools.0.autoscaling"
    with pytest.raises(SpecError, match="spec"):
        app({})
    assert AppArgs(spec="x.yaml").submit_wait_s > 0
