"""The contract's FinishReason and OpenAI's `finish_reason` strings, both ways: one table for
the gateway's HTTP and gRPC answers and the offline engine's outputs."""

from pagedserve.v1 import common_pb2

OPENAI_NAMES = {common_pb2.FINISH_REASON_STOP: "stop",
                common_pb2.FINISH_REASON_LENGTH: "length",
                common_pb2.FINISH_REASON_ABORT: "abort",
                common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}
_FROM_OPENAI = {name: reason for reason, name in OPENAI_NAMES.items()}


def openai_name(reason: int) -> str | None:
    """"stop", "length", "abort" or "tool_calls"; None for FINISH_REASON_UNSPECIFIED (not
    finished)."""
    return OPENAI_NAMES.get(reason)


def from_openai_name(name: str | None) -> int:
    """The contract's value of an OpenAI name; FINISH_REASON_UNSPECIFIED for None."""
    return _FROM_OPENAI.get(name, common_pb2.FINISH_REASON_UNSPECIFIED)
