"""TLS and mutual TLS (issue 9): with --tls-cert-file / --tls-key-file / --tls-ca-file, `pagedserve
up` runs gateway -> scheduler -> executor over mTLS and the gateway's public endpoints over TLS.
A throwaway CA and certificates are made with `cryptography`. The scheduler and the executor
refuse a plaintext client, a TLS client without a certificate and one whose certificate another
CA signed; a client with a certificate of the right CA is served, and so is a completion
through the whole stack over HTTPS."""

import json
import pathlib
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest

from pagedserve.runtime.internal_auth import Role
from pagedserve.runtime.serving import TlsConfig, sync_channel
from pagedserve.testing.pki import make_ca, make_identity
from pagedserve.testing.processes import internal_channel, running_stack
from pagedserve.v1 import (
    executor_pb2,
    executor_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, TlsConfig]:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca(directory, "pagedserve-ca")
    rogue_key, rogue_ca = make_ca(directory, "rogue-ca")
    cert, key = make_identity(directory, "pagedserve", "pagedserve-ca", ca_key)
    rogue_cert, rogue_key_file = make_identity(directory, "intruder", "rogue-ca", rogue_key)
    return {"valid": TlsConfig(str(cert), str(key), str(ca)),
            "no client certificate": TlsConfig(ca_file=str(ca)),
            "certificate of another CA": TlsConfig(str(rogue_cert), str(rogue_key_file),
                                                   str(ca)),
            "rogue": TlsConfig(ca_file=str(rogue_ca))}


def tls_stack(log_path: pathlib.Path, model_dir: pathlib.Path, tls: TlsConfig):
    """`pagedserve up` with certificates, once its gateway is ready over HTTPS."""
    return running_stack(log_path, "--model", str(model_dir), "--kv-cache-gib", "0.01",
                         "--tls-cert-file", tls.cert_file, "--tls-key-file", tls.key_file,
                         "--tls-ca-file", tls.ca_file,
                         ssl_context=ssl.create_default_context(cafile=tls.ca_file))


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory, pki):
    with tls_stack(tmp_path_factory.mktemp("tls") / "log", tiny_llama_dir, pki["valid"]) as s:
        yield s


def executor_address(stack, tls: TlsConfig) -> str:
    with internal_channel(stack.scheduler, Role.GATEWAY, tls) as channel:
        stats = scheduler_pb2_grpc.SchedulerStub(channel).GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=10)
    return stats.executors[0].address


def scheduler_call(channel: grpc.Channel):
    return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest(),
                                                              timeout=5)


def executor_call(channel: grpc.Channel):
    return executor_pb2_grpc.ExecutorStub(channel).Describe(executor_pb2.DescribeRequest(),
                                                            timeout=5)


def test_a_completion_goes_through_the_whole_stack_over_tls(stack, pki):
    assert stack.startswith("https://")
    context = ssl.create_default_context(cafile=pki["valid"].ca_file)
    request = urllib.request.Request(f"{stack}/v1/completions", data=json.dumps(
        {"prompt": "the cat", "max_tokens": 3, "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30, context=context) as reply:
        assert json.loads(reply.read())["usage"]["completion_tokens"] == 3
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plaintext HTTP
        urllib.request.urlopen(stack.replace("https://", "http://") + "/health", timeout=5)


def test_the_public_grpc_api_needs_tls_but_no_client_certificate(stack, pki):
    with sync_channel(stack.grpc, pki["no client certificate"]) as channel:
        reply = generation_pb2_grpc.GenerationStub(channel).ListModels(
            generation_pb2.ListModelsRequest(), timeout=10)
    assert reply.models
    with grpc.insecure_channel(stack.grpc) as channel, pytest.raises(grpc.RpcError):
        generation_pb2_grpc.GenerationStub(channel).ListModels(
            generation_pb2.ListModelsRequest(), timeout=5)


@pytest.mark.parametrize("service", ["scheduler", "executor"])
def test_internal_services_serve_only_clients_with_a_certificate_of_the_ca(stack, pki, service):
    address = stack.scheduler if service == "scheduler" else executor_address(stack,
                                                                              pki["valid"])
    call = scheduler_call if service == "scheduler" else executor_call
    role = Role.GATEWAY if service == "scheduler" else Role.SCHEDULER
    with internal_channel(address, role, pki["valid"]) as channel:
        reply = call(channel)
    assert reply.executors if service == "scheduler" else reply.model.model_id
    # A certificate of the CA is not a credential by itself: the call must prove its role.
    with sync_channel(address, pki["valid"]) as channel, pytest.raises(grpc.RpcError) as error:
        call(channel)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refused = {"plaintext": grpc.insecure_channel(address),
               **{name: sync_channel(address, pki[name])
                  for name in ("no client certificate", "certificate of another CA", "rogue")}}
    for name, channel in refused.items():
        with channel, pytest.raises(grpc.RpcError) as error:
            call(channel)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, (name, error.value)


@pytest.mark.parametrize("given", [("cert",), ("cert", "key"), ("ca",), ("key", "ca")])
@pytest.mark.parametrize("command", ["scheduler", "executor", "gateway", "up"])
def test_incomplete_certificate_flags_fail_at_start(pki, command, given):
    """Certificate and key without a CA would serve TLS to clients without certificates; a CA
    alone would dial in plaintext: every partial set is refused before anything listens."""
    files = {"cert": pki["valid"].cert_file, "key": pki["valid"].key_file,
             "ca": pki["valid"].ca_file}
    flags = [arg for name in given for arg in (f"--tls-{name}-file", files[name])]
    result = subprocess.run([sys.executable, "-m", "pagedserve", command, *flags],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "go together" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
