"""The Kubernetes manifests checked offline: each kustomization (k8s/, k8s/kserve/, k8s/autoscaling/) builds with
``kubectl kustomize`` (or, without kubectl, with the Python equivalent for what ours use: plain resources);
every core object validates against the Kubernetes OpenAPI schemas of K8S_VERSION (kubernetes-validate,
strict: an unknown field is an error); KServe's ServingRuntime and InferenceService validate against the
openAPIV3Schema of KServe's own CRDs (tests/data/crds/, unknown fields refused as kubectl's strict field
validation does). And the manifests agree with each other and with the server: ports, probes, the
autoscaler's metric and the series the server exports."""

from __future__ import annotations

import functools
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = Path(__file__).resolve().parent / "data" / "crds"
K8S_VERSION = "1.32.0"  # the kubectl of Debian's package here is 1.32; raise both together
KUSTOMIZATIONS = ("", "kserve", "autoscaling")  # folders under k8s/
CUSTOM = {  # (apiVersion, kind) of the custom resources -> their CRD file
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_servingruntimes.yaml.gz",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.yaml.gz",
}


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True)


def python_build(folder: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize`` makes of a kustomization that only lists resources (all ours do)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, "a kustomize feature the Python build lacks"
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((folder / name).read_text())
            if doc]


def build(folder: Path) -> list[dict[str, Any]]:
    """The folder's objects, by ``kubectl kustomize`` where kubectl is installed (and then the Python build
    must give the same objects), else by the Python build."""
    objects = python_build(folder)
    kubectl = shutil.which("kubectl")
    if kubectl:
        done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        built = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
        assert sorted(map(canonical, built)) == sorted(map(canonical, objects)), "kubectl built other objects"
    return objects


@pytest.fixture(scope="module")
def objects() -> dict[str, list[dict[str, Any]]]:
    return {name: build(K8S / name) for name in KUSTOMIZATIONS}


@functools.cache
def crd_validator(file: str, version: str) -> Any:
    """A validator of the CRD's schema for ``version``, refusing unknown fields (below)."""
    return jsonschema.Draft7Validator(refuse_unknown_fields(crd_schema(file, version)))


def crd_schema(file: str, version: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the InferenceService CRD is 2 MB
    crd = yaml.load(gzip.decompress((CRDS / file).read_bytes()), Loader=loader)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
    return schema


def refuse_unknown_fields(schema: Any) -> Any:
    """A CRD schema in which an object with declared properties takes no others, unless it says it keeps
    unknown fields: the API server's strict field validation (``kubectl apply --validate=strict``)."""
    if isinstance(schema, list):
        return [refuse_unknown_fields(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: refuse_unknown_fields(v) for k, v in schema.items()}
    keeps_unknown = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def validate_custom(obj: dict[str, Any]) -> list[str]:
    """The errors of a custom resource against its CRD's schema (metadata is the API server's to check)."""
    validator = crd_validator(CUSTOM[obj["apiVersion"], obj["kind"]], obj["apiVersion"].split("/")[1])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_every_manifest_validates(objects: dict[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture) -> None:
    report = []
    for folder, docs in objects.items():
        assert docs, f"k8s/{folder} builds nothing"
        for obj in docs:
            where = f"k8s/{folder + '/' if folder else ''} {obj['kind']}/{obj['metadata']['name']}"
            if (obj["apiVersion"], obj["kind"]) in CUSTOM:
                errors = validate_custom(obj)
                assert not errors, (where, errors)
                report.append(f"{where}: valid against KServe's CRD ({obj['apiVersion']})")
            else:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any error
                report.append(f"{where}: valid against Kubernetes {K8S_VERSION} ({obj['apiVersion']}, strict)")
    with capsys.disabled():
        print("\n" + "\n".join(report))


def test_the_validation_refuses_what_is_wrong(objects: dict[str, list[dict[str, Any]]]) -> None:
    """The checks bite: a misspelt field, a wrong type, a field out of place."""
    runtime = next(o for o in objects["kserve"] if o["kind"] == "ServingRuntime")
    typo = {**runtime, "spec": {**runtime["spec"], "supportedModelFormat": runtime["spec"]["supportedModelFormats"]}}
    assert any("supportedModelFormat" in e for e in validate_custom(typo))
    service = next(o for o in objects["kserve"] if o["metadata"]["name"] == "mrcnn")
    predictor = service["spec"]["predictor"]
    wrong = {**service, "spec": {"predictor": {**predictor, "minReplicas": "one"}}}
    assert validate_custom(wrong)
    hpa = next(o for o in objects[""] if o["kind"] == "HorizontalPodAutoscaler")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**hpa, "spec": {**hpa["spec"], "minReplica": 2}}, K8S_VERSION, strict=True)


# ---- the manifests agree with each other and with the server -----------------------------------------


def named(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_ports_and_probes_are_the_servers() -> None:
    from service.core.settings import Settings

    docs = build(K8S)
    defaults = Settings.model_fields
    container = named(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics_port = env_of(container)["MRCNN_METRICS_PORT"]  # the metrics' own port (docs/front_door.md)
    assert ports == {"http": defaults["port"].default, "grpc": defaults["grpc_port"].default,
                     "metrics": int(metrics_port)}
    annotations = named(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == metrics_port
    service = named(docs, "Service")["spec"]["ports"]
    assert {p["targetPort"] for p in service} == {"http", "grpc"}  # metrics are scraped per pod, not served
    assert next(p for p in service if p["name"] == "grpc")["appProtocol"] == "kubernetes.io/h2c"
    exposed = re.findall(r"^EXPOSE\s+(.+)$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert {int(p) for line in exposed for p in line.split()} >= {ports["http"], ports["grpc"]}


def test_kserve_runtime_and_services_fit_together() -> None:
    docs = build(K8S / "kserve")
    runtime = named(docs, "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    env = env_of(container)
    assert container["name"] == "kserve-container"  # the name KServe looks for
    assert env["MRCNN_PORT"] == "8080" and [p["containerPort"] for p in container["ports"]] == [8080]
    assert env["MRCNN_MODEL_PATH"].startswith("/mnt/models/")  # where KServe's storage initializer writes
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    services = [d for d in docs if d["kind"] == "InferenceService"]
    assert {s["spec"]["predictor"]["model"]["protocolVersion"] for s in services} == {"v2", "grpc-v2"}
    for svc in services:
        model = svc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        if model["protocolVersion"] == "grpc-v2":
            assert model["ports"] == [{"name": "h2c", "containerPort": int(env["MRCNN_GRPC_PORT"]), "protocol": "TCP"}]


def test_the_autoscaler_scales_on_a_series_the_server_exports() -> None:
    """The HPA's pods metric is the adapter rule's, the rule reads a gauge of service/core/metrics.py, and CPU
    remains as a second metric."""
    from service.core.metrics import Metrics

    hpa = named(build(K8S), "HorizontalPodAutoscaler")
    deployment = named(build(K8S), "Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    config = yaml.safe_load(named(build(K8S / "autoscaling"), "ConfigMap")["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert [p["metric"]["name"] for p in pods] == [rule["name"]["as"]]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    gauges = {m.name for m in Metrics().registry.collect() if m.type == "gauge"}
    assert series in gauges and re.fullmatch(rule["name"]["matches"], series)
    # KServe's RawDeployment variant: KEDA's Prometheus query reads the same gauge, and CPU is its second metric.
    raw = named(build(K8S / "kserve"), "InferenceService", "mrcnn-raw")
    metrics = raw["spec"]["predictor"]["autoScaling"]["metrics"]
    assert [m["type"] for m in metrics] == ["External", "Resource"] and metrics[1]["resource"]["name"] == "cpu"
    assert re.match(r"sum\((\w+)\{", metrics[0]["external"]["metric"]["query"]).group(1) == series
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
