"""A stand-in for CUDA graph capture on machines without CUDA, so that the decode graphs'
buffers, padding and replay (executor_svc/pagedserve/executor/decode_graphs.py) are tested on the
CPU: "capturing" runs the forward pass once, and each replay runs it again on whatever the
static buffers hold, writing into the first run's output as a graph replay does."""

from collections.abc import Callable

import torch


class EagerCapture:
    """A `decode_graphs.Capture` that counts replays per batch size."""

    def __init__(self):
        self.replays: dict[int, int] = {}

    def __call__(self, forward: Callable[[], torch.Tensor]
                 ) -> tuple[Callable[[], None], torch.Tensor]:
        output = forward()
        size = output.shape[0]
        self.replays[size] = 0

        def replay() -> None:
            output.copy_(forward())
            self.replays[size] += 1
        return replay, output
