#!/usr/bin/env python3
"""Renders every overlay with `kubectl kustomize`, validates each object against the
Kubernetes schemas (`kubernetes-validate --strict`), and checks KEDA ScaledObjects, which
have no schema there, against the required fields of KEDA's CRD (keda.sh/v1alpha1) and the
nats-jetstream scaler's parameters. Usage: validate.py [overlay dir ...]"""
import pathlib, subprocess, sys, tempfile

import yaml  # PyYAML, a dependency of kubernetes-validate

HERE = pathlib.Path(__file__).resolve().parent
# From KEDA's CRD: spec requires scaleTargetRef (with name) and triggers (each with type and
# metadata, a map of strings).
JETSTREAM_PARAMS = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"}


def scaled_object_errors(obj, deployments):
    name, spec, errs = obj["metadata"]["name"], obj.get("spec") or {}, []
    target = spec.get("scaleTargetRef") or {}
    if not isinstance(target.get("name"), str):
        errs.append("spec.scaleTargetRef.name is required")
    elif target.get("kind", "Deployment") == "Deployment" and target["name"] not in deployments:
        errs.append(f"scaleTargetRef names no Deployment: {target['name']}")
    for field in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        if field in spec and not isinstance(spec[field], int):
            errs.append(f"spec.{field} must be an integer")
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        errs.append("minReplicaCount > maxReplicaCount")
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        errs.append("spec.triggers is required (a non-empty list)")
        triggers = []
    for i, t in enumerate(triggers):
        meta = t.get("metadata")
        if not isinstance(t.get("type"), str) or not isinstance(meta, dict):
            errs.append(f"triggers[{i}]: type and metadata are required")
            continue
        errs += [f"triggers[{i}].metadata.{k} must be a string" for k, v in meta.items() if not isinstance(v, str)]
        if t["type"] == "nats-jetstream":
            errs += [f"triggers[{i}]: nats-jetstream needs {k}" for k in sorted(JETSTREAM_PARAMS - meta.keys())]
    return [f"ScaledObject {name}: {e}" for e in errs]


def check(overlay):
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, d in enumerate(docs):
            if d.get("apiVersion", "").startswith("keda.sh/"):
                continue
            path = pathlib.Path(tmp) / f"{i:03}-{d['kind']}-{d['metadata']['name']}.yaml"
            path.write_text(yaml.safe_dump(d))
            files.append(str(path))
        if subprocess.run(["kubernetes-validate", "--strict", "--quiet", *files]).returncode != 0:
            errors.append("kubernetes-validate --strict failed")
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    for d in scaled:
        if d.get("apiVersion") != "keda.sh/v1alpha1":
            errors.append(f"ScaledObject {d['metadata']['name']}: apiVersion must be keda.sh/v1alpha1")
        errors += scaled_object_errors(d, deployments)
    print(f"{overlay.relative_to(HERE)}: {len(docs)} objects ({len(scaled)} ScaledObjects), {len(errors)} errors")
    return errors


def main():
    overlays = [pathlib.Path(p).resolve() for p in sys.argv[1:]] or sorted((HERE / "overlays").iterdir())
    errors = [e for o in overlays for e in check(o)]
    for e in errors:
        print("error:", e, file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
