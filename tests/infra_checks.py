"""The checks behind tests/test_infra_configs.py: a schema per Kubernetes kind (the fields our
manifests must have; no network, so not the API server's full OpenAPI schema) and the
cross-references between the manifests of infra/kuberay.yaml; infra/Dockerfile's image tag."""

from __future__ import annotations

import re

import jsonschema
import yaml

from tests.servers import REPO

INFRA = REPO / "infra"


NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
CONTAINERS = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["name", "image"],
    "properties": {"name": NAME, "image": {"type": "string", "minLength": 1}}}}
POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"], "properties": {"containers": CONTAINERS}}}}
LABELLED_TEMPLATE = {"allOf": [POD_TEMPLATE, {
    "type": "object", "required": ["metadata"], "properties": {"metadata": {
        "type": "object", "required": ["labels"],
        "properties": {"labels": {"type": "object", "minProperties": 1}}}}}]}
WORKLOAD_SPEC = {"type": "object", "required": ["selector", "template"], "properties": {
    "selector": {"type": "object", "required": ["matchLabels"],
                 "properties": {"matchLabels": {"type": "object", "minProperties": 1}}},
    "template": LABELLED_TEMPLATE}}
RAY_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec", "workerGroupSpecs"],
                    "properties": {
    "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                      "properties": {"rayStartParams": {"type": "object"},
                                     "template": POD_TEMPLATE}},
    "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
        "type": "object",
        "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
        "properties": {"groupName": NAME, "replicas": {"type": "integer", "minimum": 0},
                       "minReplicas": {"type": "integer", "minimum": 0},
                       "maxReplicas": {"type": "integer", "minimum": 1},
                       "rayStartParams": {"type": "object"}, "template": POD_TEMPLATE}}}}}


def _kind(api: str, spec: dict | None = None, **top) -> dict:
    props = {"apiVersion": {"const": api}, "metadata": {
        "type": "object", "required": ["name"], "properties": {"name": NAME}}}
    required = ["apiVersion", "kind", "metadata"]
    if spec is not None:
        props["spec"], required = spec, [*required, "spec"]
    for k, v in top.items():
        props[k] = v
        required.append(k)
    return {"type": "object", "required": required, "properties": props}


SCHEMAS = {
    "StorageClass": _kind("storage.k8s.io/v1", provisioner={"type": "string", "minLength": 1}),
    "PersistentVolumeClaim": _kind("v1", {
        "type": "object", "required": ["accessModes", "storageClassName", "resources"],
        "properties": {"accessModes": {"const": ["ReadWriteMany"]},
                       "storageClassName": {"type": "string", "minLength": 1},
                       "resources": {"type": "object", "required": ["requests"], "properties": {
                           "requests": {"type": "object", "required": ["storage"]}}}}}),
    "Secret": _kind("v1", stringData={"type": "object", "minProperties": 1}),
    "Deployment": _kind("apps/v1", WORKLOAD_SPEC),
    "StatefulSet": _kind("apps/v1", {"allOf": [WORKLOAD_SPEC, {
        "type": "object", "required": ["serviceName"]}]}),
    "Service": _kind("v1", {"type": "object", "required": ["selector", "ports"], "properties": {
        "selector": {"type": "object", "minProperties": 1},
        "ports": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["port"],
            "properties": {"port": {"type": "integer"}}}}}}),
    "RayCluster": _kind("ray.io/v1", RAY_CLUSTER_SPEC),
    "RayJob": _kind("ray.io/v1", {
        "type": "object", "required": ["entrypoint"],
        "properties": {"entrypoint": {"type": "string", "pattern": r"python -m search\.run "},
                       "rayClusterSpec": RAY_CLUSTER_SPEC,
                       "clusterSelector": {"type": "object", "minProperties": 1}},
        "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}]}),
}
# Images that are not ours: the database.
THIRD_PARTY_IMAGES = {"postgres:16"}


def dockerfile_tag() -> str:
    m = re.search(r'^LABEL org\.opencontainers\.image\.ref\.name="([^"]+)"',
                  (INFRA / "Dockerfile").read_text(), re.M)
    assert m, "infra/Dockerfile has no image tag label"
    return m.group(1)


def manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / "kuberay.yaml").read_text()) if d]


def pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec") or {}
    if doc.get("kind") in ("Deployment", "StatefulSet"):
        return [spec.get("template", {}).get("spec", {})]
    out = []
    for cluster in (spec, spec.get("rayClusterSpec") or {}):
        if "headGroupSpec" in cluster:
            out.append(cluster["headGroupSpec"].get("template", {}).get("spec", {}))
        for g in cluster.get("workerGroupSpecs") or []:
            out.append(g.get("template", {}).get("spec", {}))
    if "submitterPodTemplate" in spec:
        out.append(spec["submitterPodTemplate"].get("spec", {}))
    return out


def check_manifests(docs: list[dict], tag: str) -> list[str]:
    """Every problem found in ``docs`` (schema per kind, then cross-references); [] if none."""
    errors = []
    for d in docs:
        where = f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        schema = SCHEMAS.get(d.get("kind"))
        if schema is None:
            errors.append(f"{where}: no schema for this kind")
            continue
        errors += [f"{where}: {e.json_path}: {e.message}" for e in
                   jsonschema.Draft202012Validator(schema).iter_errors(d)]
    if errors:
        return errors
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    for kind in SCHEMAS:
        if kind not in by_kind and kind != "StatefulSet":
            errors.append(f"no {kind}")
    workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {})}
    for name, w in workloads.items():
        sel = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in sel.items()):
            errors.append(f"{w['kind']}/{name}: selector {sel} does not match labels {labels}")
    for name, s in by_kind.get("Service", {}).items():
        sel = s["spec"]["selector"]
        if not any(all(w["spec"]["template"]["metadata"]["labels"].get(k) == v
                       for k, v in sel.items()) for w in workloads.values()):
            errors.append(f"Service/{name}: selector {sel} matches no Deployment/StatefulSet")
    for name, pvc in by_kind.get("PersistentVolumeClaim", {}).items():
        if pvc["spec"]["storageClassName"] not in by_kind.get("StorageClass", {}):
            errors.append(f"PersistentVolumeClaim/{name}: storage class "
                          f"{pvc['spec']['storageClassName']} not defined here")
    pvcs = by_kind.get("PersistentVolumeClaim", {})
    for d in docs:
        for pod in pod_specs(d):
            for v in pod.get("volumes") or []:
                claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is not None and claim not in pvcs:
                    errors.append(f"{d['kind']}/{d['metadata']['name']}: no PVC {claim}")
            for c in pod.get("containers", []):
                if c["image"] != tag and c["image"] not in THIRD_PARTY_IMAGES:
                    errors.append(f"{d['kind']}/{d['metadata']['name']}: image {c['image']} "
                                  f"is not infra/Dockerfile's {tag}")
    for name, rc in by_kind.get("RayCluster", {}).items():
        groups = rc["spec"]["workerGroupSpecs"]
        for g in groups:
            if not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
                errors.append(f"RayCluster/{name}: group {g['groupName']} replicas out of range")
        if not any("nvidia.com/gpu" in str(g["template"]) for g in groups):
            errors.append(f"RayCluster/{name}: no GPU worker group")
    for name, job in by_kind.get("RayJob", {}).items():
        target = (job["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
        if "clusterSelector" in job["spec"] and target not in by_kind.get("RayCluster", {}):
            errors.append(f"RayJob/{name}: clusterSelector names no RayCluster here ({target})")
    return errors
