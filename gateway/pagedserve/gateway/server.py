"""Entry point of `pagedserve gateway`: the HTTP API and the public gRPC API in one event loop."""

import argparse
import asyncio
import contextlib

import uvicorn
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from pagedserve.gateway.auth import ApiKeyInterceptor, ApiKeys, require_api_key
from pagedserve.gateway.grpc_api import GenerationService
from pagedserve.gateway.http_api import create_app
from pagedserve.gateway.policy import ClientPolicy
from pagedserve.gateway.scheduler_client import SchedulerClient
from pagedserve.runtime.internal_auth import InternalAuth, Role
from pagedserve.runtime.log import configure_logging
from pagedserve.runtime.serving import (
    GrpcServer,
    StartupError,
    run_service,
    wait_for_stop_signal,
)
from pagedserve.v1 import generation_pb2, generation_pb2_grpc

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service's stop signal drives shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(args: argparse.Namespace) -> None:
    auth = InternalAuth.from_args(args, Role.GATEWAY)
    tls = auth.tls
    client = SchedulerClient(args.scheduler_address, auth, args.tokenizer)
    try:
        keys = ApiKeys.parse(args.api_key) if args.api_key else None
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    policy = ClientPolicy.from_args(args, keys)
    app = create_app(client, args.request_timeout, policy)
    interceptors = []
    if keys is not None:
        require_api_key(app, keys)
        interceptors.append(ApiKeyInterceptor(keys))
    # Public endpoints: TLS with the gateway's certificate, no client certificates (API clients
    # authenticate with --api-key); the CA is for the internal channel to the scheduler.
    http = _HttpServer(uvicorn.Config(app, host=args.host, port=args.http_port,
                                      log_config=None, access_log=False, lifespan="off",
                                      ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file))
    grpc_server = GrpcServer(f"{args.host}:{args.grpc_port}", interceptors,
                             tls.server_credentials(require_client_cert=False))
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationService(client, policy, args.request_timeout), grpc_server.server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], grpc_server.server)
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():  # uvicorn exits (SystemExit) when it cannot bind
            with contextlib.suppress(SystemExit):
                await http_task
            raise StartupError(f"cannot listen on {args.host}:{args.http_port} for HTTP; "
                               "is the port in use?")
        await asyncio.sleep(0.02)
    await grpc_server.start([SERVICE_NAME])
    await wait_for_stop_signal()
    await grpc_server.stop()
    http.should_exit = True
    await http_task
    await client.close()


def main(args: argparse.Namespace) -> int:
    configure_logging("gateway", args.log_level, args.log_format)
    return run_service("gateway", lambda: serve(args))
