"""Entry point of `pagedserve scheduler`."""

import argparse

from pagedserve.log import configure_logging
from pagedserve.serving import GrpcServer, run_service, wait_for_stop_signal
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


async def serve(args: argparse.Namespace) -> None:
    server = GrpcServer(f"{args.host}:{args.port}")
    # The Scheduler RPCs answer UNIMPLEMENTED until the step loop lands (issue 4); the process,
    # its health service and its lifecycle are complete.
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(
        scheduler_pb2_grpc.SchedulerServicer(), server.server)
    await server.start([SERVICE_NAME])
    await wait_for_stop_signal()
    await server.stop()


def main(args: argparse.Namespace) -> int:
    configure_logging("scheduler", args.log_level, args.log_format)
    return run_service("scheduler", lambda: serve(args))
