"""Deployment artefacts, checked offline: the Docker builds (hadolint and the build context,
through `scripts/docker_context.py`), the Kubernetes manifests against the Kubernetes API
schemas (kubernetes-validate, strict), rendered with Kustomize where kubectl is installed,
and the Prometheus config and alert rules with promtool, their expressions run against a live
server."""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
PROMTOOL = ROOT / ".tmp" / "prometheus" / "usr" / "bin" / "promtool"
K8S_VERSION = "1.32"


def load_docker_context():
    spec = importlib.util.spec_from_file_location("docker_context", ROOT / "scripts" / "docker_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docker_context_and_hadolint():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "docker_context.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Docker context OK" in out.stdout


def test_docker_context_check_catches_mistakes(tmp_path):
    dc = load_docker_context()
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian AS builder\nCOPY no-such-dir /x\nCOPY target /t\n"
                   "COPY --from=missing /a /b\nRUN pip install torch==1.0\nENTRYPOINT [\"bash\"]\n")
    (tmp_path / "Dockerfile.dockerignore").write_text("*\n!proto\n**/target\n")
    errors = []
    dc.check(bad, errors)
    text = "\n".join(errors)
    for expected in ["COPY no-such-dir", "COPY target: excluded", "--from=missing", "torch", "ENTRYPOINT",
                     "no HEALTHCHECK", "no USER"]:
        assert expected in text, (expected, text)
    assert dc.ignored("target/release/x", ["*", "!proto"]) and not dc.ignored("proto/src", ["*", "!proto"])


def documents(text):
    return [d for d in yaml.safe_load_all(text) if d]


def validate(doc):
    """Strict schema validation of a built-in kind; CRDs (the ServiceMonitor) are checked apart."""
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def base_documents():
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += documents((K8S / "base" / name).read_text())
    return docs


def test_manifests_validate_against_the_kubernetes_schemas():
    docs = base_documents()
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim", "ServiceMonitor", "HorizontalPodAutoscaler"}
    for doc in docs:
        validate(doc)
    # The validator is live: a misspelt field is refused.
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_manifests_say_what_the_issue_asks():
    docs = {d["kind"]: d for d in base_documents()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The kubelet must wait longer than the launcher does for its children.
    assert pod["terminationGracePeriodSeconds"] > int(env["GRACEFUL_TERMINATION_TIMEOUT"])
    assert env["PORT"] == "8080" and container["ports"][0]["containerPort"] == 8080
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
    # Service, ServiceMonitor and the scrape annotations agree with the pods.
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    monitor = docs["ServiceMonitor"]
    assert all(service["metadata"]["labels"][k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    # The HPA scales on a metric the router really exports.
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f'"{metric}"' in (ROOT / "router" / "src" / "metrics.rs").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in Kustomize) is not installed")
@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kustomize_renders_valid_manifests(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = documents(out.stdout)
    assert len(docs) == 5
    for doc in docs:
        validate(doc)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    if overlay == "gpu":
        assert container["image"] == "tessera:cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"  # the patch kept the rest
    else:
        assert container["image"] == "tessera:cpu"


def test_prometheus_config_and_alert_rules(tiny_llama):
    if not PROMTOOL.exists():
        pytest.fail("promtool missing: run `make prometheus`")
    prom_dir = ROOT / "deploy" / "prometheus"
    out = subprocess.run([str(PROMTOOL), "check", "config", str(prom_dir / "prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert expression uses metrics the server exposes (`up` comes from Prometheus).
    r = requests.post(tiny_llama.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200
    exposed = requests.get(tiny_llama.url + "/metrics").text
    rules = yaml.safe_load((prom_dir / "tessera-alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        for name in re.findall(r"\b((?:tgi|tessera)_[a-z_]+)", rule["expr"]):
            assert re.search(rf"^{name}[{{ ]", exposed, re.M), (rule["alert"], name)
