"""Entry point of `pagedserve executor`: resolves the model, then serves the Executor service."""

import argparse
import asyncio
import uuid

import grpc

from executor_svc.model_files import (
    ModelDirectory,
    ModelLoadError,
    default_cache_dir,
    resolve_model,
)
from pagedserve.log import configure_logging
from pagedserve.serving import GrpcServer, StartupError, run_service, wait_for_stop_signal
from pagedserve.v1 import common_pb2, executor_pb2, executor_pb2_grpc

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name


class ExecutorService(executor_pb2_grpc.ExecutorServicer):
    """Describe answers from the model directory; Run (the step loop) arrives with issue 3."""

    def __init__(self, model: ModelDirectory):
        self.executor_id = f"executor-{uuid.uuid4().hex[:12]}"
        self._description = executor_pb2.DescribeResponse(
            executor_id=self.executor_id,
            model=common_pb2.ModelInfo(
                model_id=model.served_name,
                architecture=model.architecture,
                max_model_len=int(model.config.get("max_position_embeddings", 0)),
                vocab_size=int(model.config.get("vocab_size", 0)),
                eos_token_ids=model.eos_token_ids(),
            ),
            parallel=common_pb2.ParallelLayout(tensor_parallel_size=1),
            tokenizer=common_pb2.TokenizerFiles(files=model.tokenizer_files()),
        )

    async def Describe(self, request: executor_pb2.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> executor_pb2.DescribeResponse:
        return self._description


async def serve(args: argparse.Namespace) -> None:
    cache_dir = args.model_cache_dir or default_cache_dir()
    try:
        # In a thread: converting a GGUF on first start takes seconds.
        model = await asyncio.to_thread(resolve_model, args.model, cache_dir,
                                        args.served_model_name)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    server = GrpcServer(f"{args.host}:{args.port}")
    executor_pb2_grpc.add_ExecutorServicer_to_server(ExecutorService(model), server.server)
    await server.start([SERVICE_NAME])
    await wait_for_stop_signal()
    await server.stop()


def main(args: argparse.Namespace) -> int:
    configure_logging("executor", args.log_level, args.log_format)
    return run_service("executor", lambda: serve(args))
