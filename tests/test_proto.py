"""The v1 contract: committed stubs are fresh, messages round-trip, and the contract covers every
RPC and message of docs/design.md §2 and the SamplingParams fields the issues name."""

import pathlib
import subprocess
import sys

from google.protobuf import json_format

from pagedserve.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[1] / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generated(root: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "pagedserve" / "v1").iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)}


def test_committed_stubs_match_the_proto_files(tmp_path):
    subprocess.run([sys.executable, str(PROTO_ROOT / "generate.py"), "--out", str(tmp_path)],
                   check=True)
    fresh, committed = _generated(tmp_path), _generated(PROTO_ROOT)
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit the result"


def test_generated_imports_are_package_qualified():
    source = (PROTO_ROOT / "pagedserve" / "v1" / "executor_pb2_grpc.py").read_text()
    assert "from pagedserve.v1 import executor_pb2" in source
    assert "\nimport executor_pb2" not in source


def _methods(module, service: str) -> set[str]:
    return set(module.DESCRIPTOR.services_by_name[service].methods_by_name)


def test_services_cover_design_section_2():
    assert {"Generate", "Tokenize", "ListModels"} <= _methods(generation_pb2, "Generation")
    assert {"Submit", "GetStats", "RegisterExecutor", "Heartbeat", "GetModel"} <= \
        _methods(scheduler_pb2, "Scheduler")
    assert _methods(executor_pb2, "Executor") == {"Run", "Describe"}
    run = executor_pb2.DESCRIPTOR.services_by_name["Executor"].methods_by_name["Run"]
    assert run.client_streaming and run.server_streaming
    generate = generation_pb2.DESCRIPTOR.services_by_name["Generation"].methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    # The stubs exist for every service.
    assert generation_pb2_grpc.GenerationStub and scheduler_pb2_grpc.SchedulerStub
    assert executor_pb2_grpc.ExecutorStub


def test_sampling_params_cover_every_named_field():
    fields = set(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    assert {"max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
            "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed",
            "stop", "stop_token_ids", "ignore_eos", "logprobs", "prompt_logprobs", "n"} <= fields


def test_step_plan_carries_deltas_of_design_section_2():
    fields = set(executor_pb2.StepPlan.DESCRIPTOR.fields_by_name)
    assert {"new_requests", "work", "dropped_request_ids", "block_copies"} <= fields
    new = set(executor_pb2.NewRequest.DESCRIPTOR.fields_by_name)
    assert {"request_id", "token_ids", "sampling", "block_ids", "num_computed_tokens"} <= new
    assert {"request_id", "num_tokens", "new_block_ids"} <= \
        set(executor_pb2.ScheduledWork.DESCRIPTOR.fields_by_name)


def test_step_plan_round_trips_through_bytes():
    plan = executor_pb2.StepPlan(
        step_id=7,
        new_requests=[executor_pb2.NewRequest(
            request_id="r1", token_ids=[1, 2, 3, 70000], num_prompt_tokens=3,
            sampling=common_pb2.SamplingParams(max_tokens=16, temperature=0.0, top_k=-1,
                                               logit_bias={5: -100.0}, seed=2**63),
            block_ids=[4, 9], num_computed_tokens=2)],
        work=[executor_pb2.ScheduledWork(request_id="r1", num_tokens=2),
              executor_pb2.ScheduledWork(request_id="r0", num_tokens=1, new_block_ids=[11])],
        dropped_request_ids=["r-1"],
        block_copies=[executor_pb2.BlockCopy(src_block_id=3, dst_block_id=12)])
    decoded = executor_pb2.StepPlan.FromString(plan.SerializeToString())
    assert decoded == plan
    assert decoded.new_requests[0].sampling.logit_bias[5] == -100.0
    assert decoded.new_requests[0].sampling.seed == 2**63


def test_optional_fields_distinguish_unset_from_zero():
    unset = common_pb2.SamplingParams()
    greedy = common_pb2.SamplingParams.FromString(
        common_pb2.SamplingParams(temperature=0.0, logprobs=0).SerializeToString())
    assert not unset.HasField("temperature") and not unset.HasField("logprobs")
    assert greedy.HasField("temperature") and greedy.temperature == 0.0
    assert greedy.HasField("logprobs") and greedy.logprobs == 0


def test_generate_request_prompt_is_one_of_text_tokens_chat():
    request = generation_pb2.GenerateRequest(text="hello")
    request.token_ids.ids.extend([1, 2])
    assert request.WhichOneof("prompt") == "token_ids"  # setting one clears the others
    request.chat.messages.add(role="user", content="hi")
    assert request.WhichOneof("prompt") == "chat"
    as_json = json_format.MessageToJson(request)
    assert json_format.Parse(as_json, generation_pb2.GenerateRequest()) == request


def test_stream_messages_round_trip():
    delta = scheduler_pb2.TokenDelta(
        seq_index=2, token_ids=[42], finish_reason=common_pb2.FINISH_REASON_STOP,
        stop_token_id=2,
        logprobs=[common_pb2.PositionLogprobs(
            chosen=common_pb2.TokenLogprob(token_id=42, logprob=-0.5, rank=1),
            top=[common_pb2.TokenLogprob(token_id=42, logprob=-0.5, rank=1)])])
    assert scheduler_pb2.TokenDelta.FromString(delta.SerializeToString()) == delta
    result = executor_pb2.StepResult(step_id=3, outputs=[
        executor_pb2.RequestOutput(request_id="r1", token_ids=[9])], execute_seconds=0.01)
    assert executor_pb2.StepResult.FromString(result.SerializeToString()) == result
