"""TLS and mutual TLS (issue 9): with --tls-cert-file / --tls-key-file / --tls-ca-file, `pagedserve
up` runs gateway -> scheduler -> executor over mTLS and the gateway's public endpoints over TLS.
A throwaway CA and certificates are made with `cryptography`. The scheduler and the executor
refuse a plaintext client, a TLS client without a certificate and one whose certificate another
CA signed; a client with a certificate of the right CA is served, and so is a completion
through the whole stack over HTTPS."""

import datetime
import ipaddress
import json
import pathlib
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pagedserve.runtime.serving import TlsConfig, sync_channel
from pagedserve.testing.processes import running_stack
from pagedserve.v1 import (
    executor_pb2,
    executor_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

pytestmark = pytest.mark.slow


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def make_ca(directory: pathlib.Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, pathlib.Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, path


def make_identity(directory: pathlib.Path, name: str, ca_name: str,
                  ca_key: ec.EllipticCurvePrivateKey) -> tuple[pathlib.Path, pathlib.Path]:
    """A certificate for 127.0.0.1 / localhost, good as server and as client: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(name, ca_name, key.public_key())
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path


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
    with sync_channel(stack.scheduler, tls) as channel:
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
    with sync_channel(address, pki["valid"]) as channel:
        reply = call(channel)
    assert reply.executors if service == "scheduler" else reply.model.model_id
    refused = {"plaintext": grpc.insecure_channel(address),
               **{name: sync_channel(address, pki[name])
                  for name in ("no client certificate", "certificate of another CA", "rogue")}}
    for name, channel in refused.items():
        with channel, pytest.raises(grpc.RpcError) as error:
            call(channel)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, (name, error.value)


@pytest.mark.parametrize("command", ["scheduler", "up"])
def test_incomplete_certificate_flags_fail_at_start(pki, command):
    result = subprocess.run([sys.executable, "-m", "pagedserve", command,
                             "--tls-cert-file", pki["valid"].cert_file],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--tls-key-file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
