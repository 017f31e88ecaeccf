"""The lifecycle every pagedserve service shares: a uvloop event loop, a grpc.aio server with the
standard health service, and a graceful stop on SIGTERM / SIGINT; and the one way every process
opens gRPC servers and channels: with the message-size limits, and with TLS / mTLS when
certificate files are given (--tls-cert-file, --tls-key-file, --tls-ca-file)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import pathlib
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
import structlog
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# Internal messages carry tokenizer files (a large vocabulary's tokenizer.json is ~10 MB) and
# long prompts; gRPC's 4 MB default is too small. Servers and channels use the same limits.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GrpcOptions = tuple[tuple[str, object], ...]
GRPC_OPTIONS: GrpcOptions = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
# Keepalive: a peer that stops answering (a dead node, a frozen process) would leave a call
# waiting until TCP gives up, many minutes later. Channels ping every KEEPALIVE_S, also while a
# stream carries no data (a request waiting in the queue), and drop the connection, failing its
# calls with UNAVAILABLE, when a ping goes unanswered for KEEPALIVE_TIMEOUT_S (gRPC core enforces
# that bound through its ping timeout; its keepalive timeout alone never fires, and the ping
# timeout defaults to a minute). Servers accept pings that often: gRPC's default (one every five
# minutes while no data flows) answers the third early one with GOAWAY "too_many_pings", which
# fails every call on the connection, so a stream quiet for ~50 s (a request waiting in the queue,
# an idle executor's Run stream, a long prefill on a slow CPU) would be cut. The option's name is
# the string gRPC core reads (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS is
# "grpc.http2.min_ping_interval_without_data_ms"; the "min_recv_..." spelling is silently ignored).
KEEPALIVE_S = 10
KEEPALIVE_TIMEOUT_S = 10


def channel_options(keepalive_s: float = KEEPALIVE_S,
                    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> GrpcOptions:
    """Every channel's options: the message limits and keepalive pings every `keepalive_s`."""
    return (*GRPC_OPTIONS,
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0))


def server_options(min_ping_interval_s: float = KEEPALIVE_S / 2) -> GrpcOptions:
    """Every server's options: the message limits, pings accepted as often as every
    `min_ping_interval_s` while no data flows (more often still counts against the peer), and
    no SO_REUSEPORT. gRPC sets that on Linux by default, so a server given a port another
    gRPC server already listens on starts without error and the kernel splits new connections
    between the two: a test stack whose scheduler and executor were handed the same port
    answered "Method not found" to some scheduler calls. Without it the bind fails, and
    GrpcServer.start says the port is in use."""
    return (*GRPC_OPTIONS,
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(min_ping_interval_s * 1000)),
            ("grpc.so_reuseport", 0))


CHANNEL_OPTIONS = channel_options()
SERVER_OPTIONS = server_options()
# Seconds in-flight RPCs get to finish after a stop signal.
STOP_GRACE_S = 5.0

log = structlog.get_logger(__name__)


_PR_SET_PDEATHSIG = 1


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports nothing listens on right now on `host` (held open together so they differ); a
    process that binds one later may still lose a race for it."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def die_with_parent() -> None:
    """A child process's `preexec_fn` (runs before exec): the kernel sends it SIGKILL when
    its parent dies, so that no child outlives it. Linux takes "parent" to be the thread that
    started the child: start such children from a thread that lives as long as they should."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class StartupError(Exception):
    """A service cannot start; the message is one line meant for the operator."""


@dataclass(frozen=True)
class TlsConfig:
    """One process's certificate files. `cert_file` / `key_file`: its identity, served to the
    peers that dial it and presented as a client certificate when it dials. `ca_file`: the
    authority every peer's certificate must chain to; internal servers require a client
    certificate from it (mutual TLS). A process takes all three or none (plaintext: loopback,
    tests); a partial set would silently drop either encryption or client authentication.
    Tests build partial sets directly, as the clients they play."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TlsConfig:
        """From the common flags; raises StartupError for an incomplete or unreadable set."""
        tls = cls(args.tls_cert_file, args.tls_key_file, args.tls_ca_file)
        given = [path is not None for path in (tls.cert_file, tls.key_file, tls.ca_file)]
        if any(given) and not all(given):
            raise StartupError("--tls-cert-file, --tls-key-file and --tls-ca-file go together: "
                               "a certificate without a CA would serve TLS to unauthenticated "
                               "clients, a CA without a certificate would dial in plaintext")
        for flag, path in (("--tls-cert-file", tls.cert_file), ("--tls-key-file", tls.key_file),
                           ("--tls-ca-file", tls.ca_file)):
            if path is not None and not pathlib.Path(path).is_file():
                raise StartupError(f"{flag}: {path} is not a readable file")
        return tls

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None or self.ca_file is not None

    @property
    def mutual(self) -> bool:
        """Certificate, key and CA: servers require client certificates of the CA."""
        return None not in (self.cert_file, self.key_file, self.ca_file)

    def _read(self, path: str | None) -> bytes | None:
        return None if path is None else pathlib.Path(path).read_bytes()

    def server_credentials(self, require_client_cert: bool = True
                           ) -> grpc.ServerCredentials | None:
        """None without a certificate. With a CA and `require_client_cert`, peers must show a
        certificate it signed (public endpoints pass False: API clients have none)."""
        if self.cert_file is None:
            return None
        ca = self._read(self.ca_file) if require_client_cert else None
        return grpc.ssl_server_credentials(
            [(self._read(self.key_file), self._read(self.cert_file))], root_certificates=ca,
            require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """None without TLS; else the CA to verify the server by (the system's when unset) and
        this process's certificate as its client certificate."""
        if not self.enabled:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca_file),
                                            private_key=self._read(self.key_file),
                                            certificate_chain=self._read(self.cert_file))


NO_TLS = TlsConfig()


def aio_channel(address: str, tls: TlsConfig = NO_TLS,
                options: Sequence[tuple[str, object]] = CHANNEL_OPTIONS,
                interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS when `tls` is enabled, with the message limits
    (internal channels: InternalAuth.channel, which adds the caller's credentials)."""
    credentials = tls.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options,
                                         interceptors=list(interceptors))
    return grpc.aio.secure_channel(address, credentials, options=options,
                                   interceptors=list(interceptors))


def sync_channel(address: str, tls: TlsConfig = NO_TLS) -> grpc.Channel:
    """The blocking twin of aio_channel (probes, tools)."""
    credentials = tls.channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


class GrpcServer:
    """A grpc.aio server that reports SERVING on grpc.health.v1 once started; over TLS when
    given `credentials` (TlsConfig.server_credentials)."""

    def __init__(self, address: str, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None):
        self.address = address
        self.credentials = credentials
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []

    async def start(self, service_names: Iterable[str]) -> None:
        """Listen and mark the server ("") and each named service SERVING."""
        try:
            if self.credentials is None:
                self.server.add_insecure_port(self.address)
            else:
                self.server.add_secure_port(self.address, self.credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {self.address} ({exc}); "
                               "is the port in use?") from None
        await self.server.start()
        self._service_names = ["", *service_names]
        for name in self._service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("grpc listening", address=self.address, tls=self.credentials is not None)

    async def stop(self) -> None:
        for name in self._service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(STOP_GRACE_S)


async def wait_for_stop_signal() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stop signal received, shutting down")


def run_service(service: str, main: Callable[[], Awaitable[None]]) -> int:
    """Runs `main` on uvloop; a StartupError becomes one line on stderr and exit status 2."""
    try:
        uvloop.run(main())
    except StartupError as exc:
        log.error("cannot start", error=str(exc))
        print(f"pagedserve {service}: error: {exc}", file=sys.stderr)
        return 2
    return 0
