"""The lifecycle every pagedserve service shares: a uvloop event loop, a grpc.aio server with the
standard health service, and a graceful stop on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
import structlog
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# Internal messages carry tokenizer files (a large vocabulary's tokenizer.json is ~10 MB) and
# long prompts; gRPC's 4 MB default is too small. Servers and channels use the same limits.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
# Seconds in-flight RPCs get to finish after a stop signal.
STOP_GRACE_S = 5.0

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """A service cannot start; the message is one line meant for the operator."""


class GrpcServer:
    """A grpc.aio server that reports SERVING on grpc.health.v1 once started."""

    def __init__(self, address: str, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()):
        self.address = address
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=list(interceptors))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []

    async def start(self, service_names: Iterable[str]) -> None:
        """Listen and mark the server ("") and each named service SERVING."""
        try:
            self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {self.address} ({exc}); "
                               "is the port in use?") from None
        await self.server.start()
        self._service_names = ["", *service_names]
        for name in self._service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("grpc listening", address=self.address)

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
