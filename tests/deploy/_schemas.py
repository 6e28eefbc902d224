"""Offline validators for the deployment files: KubeRay CRDs and Ray Serve configs.

KubeRay's CRDs carry an OpenAPI v3 schema per version. Kubernetes prunes unknown fields
silently, so a typo in a manifest is dropped without a word; validated here, unknown
fields are errors: every object schema that lists ``properties`` gets
``additionalProperties: false`` unless it says ``x-kubernetes-preserve-unknown-fields``
(or already constrains ``additionalProperties``).

The manifests also hold PersistentVolumeClaims (kuberay/storage.yaml), a core Kubernetes
kind with no CRD here: ``PVC_SCHEMA`` is a strict schema of the part of it that
fleet's claims use (``manifest_errors`` picks the schema by kind).
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator


def _crd_dir() -> Path | None:
    """KubeRay's CRDs: $FLEET_KUBERAY_CRDS, or ../shared/kuberay-crds beside the
    repository (as CI lays it out); None when neither holds them."""
    import os

    repo = Path(__file__).resolve().parents[2]
    candidates = (
        [Path(os.environ["FLEET_KUBERAY_CRDS"])] if "FLEET_KUBERAY_CRDS" in os.environ else []
    )
    candidates.append(repo.parent / "shared" / "kuberay-crds")
    for c in candidates:
        if (c / "ray.io_rayclusters.yaml").is_file():
            return c
    return None


CRD_DIR = _crd_dir()
CRDS_MISSING = (
    "KubeRay's CRDs were not found: put ray.io_rayclusters.yaml, ray.io_rayservices.yaml "
    "and ray.io_rayjobs.yaml from KubeRay's ray-operator/config/crd/bases "
    "(https://github.com/ray-project/kuberay) in ../shared/kuberay-crds beside this "
    "repository, or name their directory in $FLEET_KUBERAY_CRDS"
)
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
}


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema in which unknown object fields are errors."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


# The CRDs are 1 MB of YAML each: libyaml reads them ten times faster.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def crd_schema(kind: str, version: str) -> dict[str, Any]:
    """The strict JSON Schema of one KubeRay CRD version (the calling test is skipped,
    with the reason, when the CRDs are absent: a user's clone has nothing beside it)."""
    if CRD_DIR is None:
        import pytest

        pytest.skip(CRDS_MISSING)
    with open(CRD_DIR / CRD_FILES[kind], encoding="utf-8") as fh:
        crd = yaml.load(fh, Loader=_Loader)  # a safe loader
    assert crd["spec"]["names"]["kind"] == kind
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    raise KeyError(f"{kind} has no version {version!r}")


@cache
def crd_validator(kind: str, version: str) -> Draft202012Validator:
    return Draft202012Validator(crd_schema(kind, version))


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation in one KubeRay manifest, as ``path: message``."""
    group, _, version = doc.get("apiVersion", "").partition("/")
    if group != "ray.io" or doc.get("kind") not in CRD_FILES:
        return [f"<root>: not a KubeRay resource: {doc.get('apiVersion')} {doc.get('kind')}"]
    return _errors(crd_validator(doc["kind"], version), doc)


# A Kubernetes resource quantity, as KubeRay's CRDs spell it for int-or-string fields.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_STORAGE = {
    "type": "object",
    "properties": {"storage": {"type": "string", "pattern": QUANTITY_PATTERN}},
}

PVC_SCHEMA: dict[str, Any] = strict(
    {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "PersistentVolumeClaim"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
                    "namespace": {"type": "string"},
                    "labels": _STRING_MAP,
                    "annotations": _STRING_MAP,
                },
            },
            "spec": {
                "type": "object",
                "required": ["accessModes", "resources"],
                "properties": {
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "uniqueItems": True,
                        "items": {
                            "enum": [
                                "ReadWriteOnce",
                                "ReadOnlyMany",
                                "ReadWriteMany",
                                "ReadWriteOncePod",
                            ]
                        },
                    },
                    "resources": {
                        "type": "object",
                        "required": ["requests"],
                        "properties": {
                            "requests": {**_STORAGE, "required": ["storage"]},
                            "limits": _STORAGE,
                        },
                    },
                    "storageClassName": {"type": "string"},
                    "volumeMode": {"enum": ["Filesystem", "Block"]},
                    "volumeName": {"type": "string"},
                },
            },
        },
    }
)


@cache
def _pvc_validator() -> Draft202012Validator:
    return Draft202012Validator(PVC_SCHEMA)


def _errors(v: Draft202012Validator, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def pvc_errors(doc: dict[str, Any]) -> list[str]:
    """Every violation of ``PVC_SCHEMA`` in one PersistentVolumeClaim, as ``path:
    message``."""
    return _errors(_pvc_validator(), doc)


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation in one document of kuberay/: a KubeRay resource against
    its CRD, a PersistentVolumeClaim against ``PVC_SCHEMA``; any other kind is an error
    until it has a schema here."""
    if doc.get("apiVersion") == "v1" and doc.get("kind") == "PersistentVolumeClaim":
        return pvc_errors(doc)
    return crd_errors(doc)
