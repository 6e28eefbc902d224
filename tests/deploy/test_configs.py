"""Offline checks of the deployment files: kuberay/ against KubeRay v1.7.0's CRDs and
every Serve config (serve_configs/ and the one inside the RayService) against Ray
Serve's own schema, strictly (unknown fields are errors). No Ray cluster needed."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from fleet.serve_app import AppArgs, app, check_serve_config, resolve_spec
from fleet.spec import SpecError
from tests.deploy._schemas import CRD_FILES, crd_errors, crd_schema, strict

REPO = Path(__file__).resolve().parents[2]
KUBERAY = sorted((REPO / "kuberay").glob("*.yaml"))
SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kinds() -> dict[str, dict]:
    return {d["kind"]: d for p in KUBERAY for d in _docs(p)}


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
    docs = _docs(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert crd_errors(doc) == [], f"{path.name} ({doc.get('kind')})"


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


def test_the_rayservice_config_is_serve_configs_shop_apart_from_the_listen_address():
    embedded = _embedded_serve_config()
    shop = yaml.safe_load((REPO / "serve_configs/shop.yaml").read_text())
    assert embedded["http_options"]["host"] == "0.0.0.0"
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
