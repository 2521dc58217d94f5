"""Helpers of the deployment checks: rendering overlays and validating every object.

Core Kubernetes kinds are validated with ``kubernetes-validate`` (strict: unknown fields are
errors); custom resources with the ``openAPIV3Schema`` of the upstream CRDs kept in
``deploy/schemas/k8s-crds`` (made strict the same way). An object of a kind that has no schema in
either place is an error, never silently accepted.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# Upstream schemas copied into the repo (deploy/schemas/README.md says from where).
SCHEMA_DIR = REPO_ROOT / "deploy" / "schemas"
CRD_DIR = SCHEMA_DIR / "k8s-crds"
COMPOSE_SCHEMA = SCHEMA_DIR / "compose-spec.json"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")

KUBERNETES_VERSION = "1.32"
"""The Kubernetes version the manifests target (kubectl here is 1.32 too)."""

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


class ManifestError(AssertionError):
    """An object that does not validate (or has no schema to validate against)."""


def load_generator() -> ModuleType:
    """``deploy/k8s/generate.py`` as a module (it is a script, not a package)."""
    name = "omni_deploy_k8s_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, K8S_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def kubectl() -> str:
    """Path of kubectl; fails the test (not skips) when it is missing."""
    path = shutil.which("kubectl")
    if path is None:
        raise ManifestError("kubectl is not on PATH: cannot render the kustomize overlays")
    return path


@functools.cache
def render_overlay(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize deploy/k8s/overlays/<overlay>`` renders."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise ManifestError(f"kustomize {overlay} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def object_id(obj: Mapping[str, Any]) -> str:
    """``apiVersion/kind/name`` of an object, for messages."""
    meta = obj.get("metadata") or {}
    return f"{obj.get('apiVersion')}/{obj.get('kind')}/{meta.get('name')}"


def _strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema in which objects reject unknown fields.

    The API server prunes (or, with strict field validation, rejects) fields a structural
    schema does not declare; plain JSON schema would accept them. Objects that declare
    ``properties`` but neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields`` get ``additionalProperties: false``.
    """
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    if "properties" in schema:
        # Property *names* are not schemas: keep them as they are, recurse into each value.
        strict["properties"] = {
            name: _strict(value) for name, value in schema["properties"].items()
        }
    return strict


@functools.cache
def crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind) -> strict openAPIV3Schema`` of every served CRD version."""
    if not crd_dir.is_dir():
        raise ManifestError(f"no CRDs at {crd_dir} (see deploy/schemas/README.md)")
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served", True) and "schema" in version:
                    schemas[(f"{group}/{version['name']}", kind)] = _strict(
                        version["schema"]["openAPIV3Schema"]
                    )
    return schemas


def _metadata_errors(obj: Mapping[str, Any]) -> Iterator[str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        yield "metadata is missing"
        return
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.match(name):
        yield f"metadata.name {name!r} is not a DNS-1123 subdomain"
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            yield f"label {key}={value!r} is not a valid label value"
    for key, value in (meta.get("annotations") or {}).items():
        if not isinstance(value, str):
            yield f"annotation {key} must be a string, not {type(value).__name__}"


def validation_errors(obj: Mapping[str, Any]) -> list[str]:
    """Why ``obj`` is invalid (empty when it is valid)."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return ["apiVersion and kind are required"]
    schema = crd_schemas().get((api_version, kind))
    if schema is not None:
        errors = list(_metadata_errors(obj))
        validator = jsonschema.Draft4Validator(schema)
        errors += [
            f"{error.json_path}: {error.message}"
            for error in sorted(validator.iter_errors(dict(obj)), key=lambda e: e.json_path)
        ]
        return errors
    try:
        kubernetes_validate.validate(dict(obj), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {api_version} {kind}: not a core kind nor a known CRD"]
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        return [f"{path}: {error.message}"]
    return []


def assert_valid(obj: Mapping[str, Any]) -> None:
    """Raise :class:`ManifestError` when ``obj`` does not validate."""
    errors = validation_errors(obj)
    if errors:
        raise ManifestError(f"{object_id(obj)} is invalid:\n  " + "\n  ".join(errors))


def by_kind(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind, by name."""
    return {o["metadata"]["name"]: o for o in objects if o.get("kind") == kind}


def acl_sets(user: Mapping[str, Any]) -> tuple[set[str], set[str], set[str]]:
    """``(topics read, topics written, groups read)`` granted by a KafkaUser."""
    read: set[str] = set()
    written: set[str] = set()
    groups: set[str] = set()
    for acl in user["spec"]["authorization"]["acls"]:
        resource, operations = acl["resource"], set(acl["operations"])
        assert acl.get("type", "allow") == "allow", f"unexpected deny ACL in {user}"
        assert resource.get("patternType", "literal") == "literal", "ACLs must be literal"
        if resource["type"] == "topic":
            if "Read" in operations:
                read.add(resource["name"])
            if "Write" in operations:
                written.add(resource["name"])
            extra = operations - {"Read", "Write", "Describe"}
            assert not extra, f"{resource['name']}: more than least privilege: {extra}"
        elif resource["type"] == "group":
            assert operations <= {"Read", "Describe"}, f"group ACL too wide: {operations}"
            groups.add(resource["name"])
        else:
            raise AssertionError(f"unexpected ACL resource {resource}")
    return read, written, groups
