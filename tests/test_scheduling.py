"""The scheduler's step loop driving a real executor, in process and over gRPC (the same tests
for both handles), checked against `transformers` greedy generation: continuous batching of
mixed requests, chunked prefill within the budget, preemption under memory pressure, prefix
hits, parallel sampling, and aborts that free their blocks; and seeded sampling that a
preemption or a lost executor leaves unchanged."""

import asyncio
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.entrypoints.offline import LLM
from pagedserve.runtime.internal_auth import Role
from pagedserve.scheduler.admission import admit_request
from pagedserve.scheduler.cluster import Cluster, ClusterConfig, Submission
from pagedserve.scheduler.executor_handle import ExecutorLost, GrpcExecutorHandle
from pagedserve.testing.processes import internal_auth, start_executor
from pagedserve.testing.registrations import registration
from pagedserve.v1 import common_pb2, scheduler_pb2

BLOCK = 4
BYTES_PER_BLOCK = 2 * 2 * BLOCK * 2 * 16 * 4  # layers x (K, V) x tokens x kv heads x dim x f32
EOS = 2
GREEDY = common_pb2.SamplingParams(temperature=0.0)

pytestmark = pytest.mark.slow


def greedy(max_tokens: int, **fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **fields)


class RecordingHandle:
    """Wraps a handle, keeping every plan sent and result received."""

    def __init__(self, inner):
        self.inner, self.plans, self.results = inner, [], []

    async def send(self, plan):
        self.plans.append(plan)
        await self.inner.send(plan)

    async def receive(self):
        result = await self.inner.receive()
        self.results.append(result)
        return result

    async def close(self):
        await self.inner.close()


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def reference(hf_model, prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    """transformers' greedy output as the scheduler reports it: EOS excluded, 'stop' or
    'length'."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens,
                                do_sample=False, eos_token_id=EOS, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    if EOS in tokens:
        return tokens[:tokens.index(EOS)], "stop"
    return tokens, "length"


@pytest.fixture(scope="module", params=["in-process", "grpc"])
def make_llm(request, tiny_llama_dir, tmp_path_factory):
    """Builds an LLM over a fresh executor with the given pool size and budget."""
    processes = []

    def make(num_blocks: int = 2048, max_num_batched_tokens: int = 2048, overlap: bool = True,
             max_model_len: int = 256, speculative: bool = False) -> LLM:
        engine = dict(kv_cache_gib=(num_blocks + 0.5) * BYTES_PER_BLOCK / 2**30,
                      block_size=BLOCK, max_num_batched_tokens=max_num_batched_tokens,
                      max_model_len=max_model_len, dtype="float32")
        if speculative:
            engine["speculative_config"] = NGRAM
        if request.param == "in-process":
            llm = LLM(str(tiny_llama_dir), overlap=overlap, **engine)
        else:
            llm = _grpc_llm(tiny_llama_dir, tmp_path_factory, processes, engine, overlap)
        inner = llm.make_handle
        llm.recorder = None

        def recording_handle():
            llm.recorder = RecordingHandle(inner())
            return llm.recorder
        llm.make_handle = recording_handle
        return llm

    yield make
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def _grpc_llm(model_dir, tmp_path_factory, processes, engine, overlap) -> LLM:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in engine.items()]
    process, address, description = start_executor(
        model_dir, tmp_path_factory.mktemp("executor") / "log", *flags)
    processes.append(process)
    llm = LLM.__new__(LLM)
    auth = internal_auth(Role.SCHEDULER)
    llm._attach(model_dir, description, lambda: GrpcExecutorHandle(address, auth=auth),
                enable_prefix_caching=True, overlap=overlap)
    return llm


# Speculative decoding (docs/speculative_decoding.md): n-gram proposals of up to 3 tokens.
NGRAM = ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, '
         '"prompt_lookup_max": 3}')

MIXED = [(list(range(30, 30 + n)), max_tokens)
         for n, max_tokens in [(1, 5), (2, 1), (3, 9), (5, 2), (8, 7), (13, 3), (21, 10),
                               (34, 4), (55, 6), (89, 8)]]


@pytest.mark.parametrize("overlap", [True, False])
def test_concurrent_mixed_requests_match_transformers(make_llm, hf_model, overlap):
    llm = make_llm(overlap=overlap)
    outputs = llm.generate([p for p, _ in MIXED], [greedy(m) for _, m in MIXED])
    for (prompt, max_tokens), output in zip(MIXED, outputs, strict=True):
        tokens, reason = reference(hf_model, prompt, max_tokens)
        assert (output.outputs[0].token_ids, output.outputs[0].finish_reason) == (tokens, reason)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


REPEATING = [5, 6, 7, 8, 9] * 3 + [5, 6]


@pytest.mark.parametrize("overlap", [True, False])
def test_speculation_changes_no_token(make_llm, hf_model, overlap):
    """Greedy requests (transformers' tokens), seeded ones with n > 1 and a stop token: the
    same with n-gram speculation as without, in fewer steps, every block back."""
    prompts = [p for p, _ in MIXED] + [REPEATING, REPEATING[2:]]
    params = [greedy(m) for _, m in MIXED] + [
        common_pb2.SamplingParams(temperature=0.1, seed=9, n=2, max_tokens=30),
        greedy(30, stop_token_ids=[7])]
    plain = make_llm(overlap=overlap)
    expected = token_ids(plain.generate(prompts, params))
    llm = make_llm(overlap=overlap, speculative=True)
    outputs = llm.generate(prompts, params)
    assert token_ids(outputs) == expected
    for (prompt, max_tokens), output in zip(MIXED, outputs[:len(MIXED)], strict=True):
        assert output.outputs[0].token_ids == reference(hf_model, prompt, max_tokens)[0]
    counters = llm.scheduler.counters
    assert 0 < counters.accepted_tokens <= counters.draft_tokens
    assert counters.steps < plain.scheduler.counters.steps
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_preemption_under_memory_pressure_changes_nothing(make_llm, hf_model):
    llm = make_llm(num_blocks=24, max_model_len=64)  # 96 slots for 8 requests of 30 tokens
    prompts = [list(range(40 + i, 50 + i)) for i in range(8)]
    outputs = llm.generate(prompts, greedy(20, ignore_eos=True))
    assert llm.scheduler.counters.preemptions > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20,
                                         min_new_tokens=20, do_sample=False)[0, 10:].tolist()
        assert output.outputs[0].token_ids == expected
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


# Structured output that never ends within max_tokens: a letter, a digit, and again.
PATTERN = "([a-m][0-9])+"


def seeded(max_tokens: int, seed: int, n: int = 1, grammar: bool = False
           ) -> common_pb2.SamplingParams:
    """With `grammar`, PATTERN: a recomputed sequence's matcher must replay its tokens."""
    params = common_pb2.SamplingParams(temperature=1.2, top_p=0.95, max_tokens=max_tokens,
                                       seed=seed, n=n, ignore_eos=True)
    if grammar:
        params.structured_output.regex = PATTERN
    return params


def token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in output.outputs] for output in outputs]


@pytest.mark.parametrize("grammar", [False, True], ids=["free", "grammar"])
@pytest.mark.parametrize("speculative", [False, True])
def test_preemption_leaves_seeded_sampling_unchanged(make_llm, speculative, grammar):
    """A preempted sequence (forked children too) is recomputed from prompt + accepted tokens
    and samples on as the undisturbed run, which an ample pool without speculation gives;
    with speculation, its lookahead slots go back with its blocks; with a grammar, its
    matcher replays the tokens (the answers then match it)."""
    prompts = [list(range(40 + i, 50 + i)) for i in range(6)]
    params = [seeded(20, seed=100 + i, n=1 + i % 2, grammar=grammar) for i in range(6)]
    ample = make_llm()
    expected = token_ids(ample.generate(prompts, params))
    assert ample.scheduler.counters.preemptions == 0
    # 96 slots for 9 sequences of 30 tokens
    tight = make_llm(num_blocks=24, max_model_len=64, speculative=speculative)
    assert token_ids(tight.generate(prompts, params)) == expected
    assert tight.scheduler.counters.preemptions > 0
    assert (tight.scheduler.counters.speculative_decodes > 0) == speculative
    assert tight.blocks.num_free_blocks == tight.blocks.num_blocks
    assert all(len({tuple(c) for c in choices}) == len(choices) for choices in expected)
    if grammar:
        texts = [c.text for output in tight.generate(prompts[:1], params[:1])
                 for c in output.outputs]
        assert all(re.fullmatch(PATTERN, text) for text in texts), texts


class LosingHandle:
    """A handle whose executor is lost (its stream breaks) after `results` step results;
    counts the tokens those results carried."""

    def __init__(self, inner, results: int):
        self.inner, self.results_left, self.tokens = inner, results, 0

    async def send(self, plan):
        await self.inner.send(plan)

    async def receive(self):
        if not self.results_left:
            raise ExecutorLost("the test broke the stream")
        self.results_left -= 1
        result = await self.inner.receive()
        self.tokens += sum(len(output.token_ids) for output in result.outputs)
        return result

    async def close(self):
        await self.inner.close()


@pytest.mark.parametrize("grammar", [False, True], ids=["free", "grammar"])
@pytest.mark.parametrize("speculative", [False, True])
def test_a_lost_executor_leaves_seeded_sampling_unchanged(make_llm, speculative, grammar):
    """Executor a is lost after a few steps; the cluster recomputes the request on b from its
    prompt + accepted tokens, and the client sees what an undisturbed run (without
    speculation) gives; with a grammar, b's matchers replay the tokens a sampled."""
    prompt, params = list(range(60, 72)), seeded(16, seed=5, n=2, grammar=grammar)
    first, second = make_llm(speculative=speculative), make_llm(speculative=speculative)
    [undisturbed] = token_ids(make_llm().generate([prompt], params))

    async def run() -> list[list[int]]:
        losing = LosingHandle(first.make_handle(), results=4)
        handles = {"a:1": losing, "b:1": second.make_handle()}
        cluster = Cluster(ClusterConfig(), lambda address, session: handles[address])
        tokens, failures, done = [[], []], [], asyncio.Event()

        def emit(delta: scheduler_pb2.TokenDelta) -> None:
            tokens[delta.seq_index] += delta.token_ids
            if all(len(t) == params.max_tokens for t in tokens):
                done.set()

        def fail(code: str, message: str) -> None:
            failures.append(message)
            done.set()
        cluster.register(registration("a", first))
        cluster.submit("tiny", Submission("r", prompt, params, 0, emit), fail)
        cluster.register(registration("b", second))  # after: r is a's
        await asyncio.wait_for(done.wait(), timeout=60)
        assert not failures
        assert "a" not in cluster.pools and 0 < losing.tokens < 2 * params.max_tokens
        cluster.finished("r")
        for pool in cluster.pools.values():
            pool.task.cancel()
            await pool.handle.close()
        return tokens

    assert asyncio.run(run()) == undisturbed
    assert undisturbed[0] != undisturbed[1]


def test_chunked_prefill_keeps_the_budget_and_short_requests_flowing(make_llm, hf_model):
    llm = make_llm(max_num_batched_tokens=8)
    long_prompt = list(range(100, 160))
    shorts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    outputs = llm.generate([long_prompt, *shorts],
                           [greedy(3, ignore_eos=True), *[greedy(4, ignore_eos=True)] * 3])
    plans = llm.recorder.plans
    assert all(sum(w.num_tokens for w in plan.work) <= 8 for plan in plans)
    long_id = outputs[0].request_id
    # The long prompt needs 8 steps of prefill; the short ones finish meanwhile.
    first_long_sample = next(i for i, r in enumerate(llm.recorder.results)
                             if any(o.request_id == long_id and o.token_ids for o in r.outputs))
    short_ids = {o.request_id for o in outputs[1:]}
    last_short_work = max(i for i, p in enumerate(plans)
                          if any(w.request_id in short_ids for w in p.work))
    assert last_short_work < first_long_sample
    for prompt, output, n in zip([long_prompt, *shorts], outputs, [3, 4, 4, 4], strict=True):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False)[0, len(prompt):]
        assert output.outputs[0].token_ids == expected.tolist()


def test_chat_renders_the_template_as_transformers_does(make_llm, hf_model):
    llm = make_llm()
    conversations = [[{"role": "user", "content": "hello there"}],
                     [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "the cat"}]]
    outputs = llm.chat(conversations, greedy(5, ignore_eos=True))
    for conversation, output in zip(conversations, outputs, strict=True):
        ids = llm.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        assert output.prompt_token_ids == list(ids)
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=5,
                                         min_new_tokens=5, do_sample=False)[0, len(ids):]
        assert output.outputs[0].token_ids == expected.tolist()
    [single] = llm.chat(conversations[0], greedy(5, ignore_eos=True))  # one conversation
    assert single.outputs[0].token_ids == outputs[0].outputs[0].token_ids


def test_prefix_hits_skip_computation(make_llm):
    llm = make_llm(overlap=False)  # no extra step in flight: counts are exact
    prompt = list(range(60, 100))  # 40 tokens = 10 full blocks
    first = llm.generate([prompt], greedy(4, ignore_eos=True))[0]
    computed_before = llm.scheduler.counters.scheduled_tokens
    second = llm.generate([prompt], greedy(4, ignore_eos=True))[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 36  # the last block is recomputed to get logits
    assert llm.scheduler.counters.scheduled_tokens - computed_before == 4 + 3
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_prompt_logprobs_skip_the_prefix_cache(make_llm):
    """A cached prefix has no logits: a request asking for prompt logprobs computes its whole
    prompt (and gets an entry per prompt token), while one that does not still hits."""
    llm = make_llm(overlap=False)
    prompt = list(range(60, 100))  # 40 tokens = 10 full blocks
    wants = greedy(2, ignore_eos=True, prompt_logprobs=1)
    first = llm.generate([prompt], wants)[0]
    again = llm.generate([prompt], wants)[0]
    plain = llm.generate([prompt], greedy(2, ignore_eos=True))[0]
    assert (first.num_cached_tokens, again.num_cached_tokens, plain.num_cached_tokens) == \
        (0, 0, 36)
    assert len(again.prompt_logprobs) == len(first.prompt_logprobs) == len(prompt)
    assert [e.chosen.logprob for e in again.prompt_logprobs[1:]] == pytest.approx(
        [e.chosen.logprob for e in first.prompt_logprobs[1:]], abs=1e-5)


def test_parallel_sampling_forks_and_seeds(make_llm, hf_model):
    llm = make_llm()
    prompt = list(range(70, 79))
    tokens, _ = reference(hf_model, prompt, 6)
    [greedy_out] = llm.generate([prompt], greedy(6, n=3))
    assert [c.token_ids for c in greedy_out.outputs] == [tokens] * 3

    sampled = common_pb2.SamplingParams(temperature=1.5, max_tokens=8, n=4, seed=7,
                                        ignore_eos=True)
    [first] = llm.generate([prompt], sampled)
    [again] = llm.generate([prompt], sampled)
    runs = [c.token_ids for c in first.outputs]
    assert runs == [c.token_ids for c in again.outputs]  # seed + index: reproducible
    assert len({tuple(r) for r in runs}) > 1  # and the sequences differ from each other
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_stopping_one_sequence_frees_it_and_the_others_go_on(make_llm):
    """What the gateway asks when a stop string ends one choice of an n > 1 request."""
    llm = make_llm(overlap=False)

    async def run() -> None:
        handle = llm.make_handle()
        deltas = []
        request = admit_request("two", list(range(50, 70)), greedy(12, n=2, ignore_eos=True),
                                0, llm.pool_limits, deltas.append)
        llm.scheduler.add(request)
        while not {d.seq_index for d in deltas if d.token_ids} == {0, 1}:
            await handle.send(llm.scheduler.schedule())
            llm.scheduler.process(await handle.receive())
        used = llm.blocks.num_used_blocks
        llm.scheduler.stop("two", 0)
        assert llm.blocks.num_used_blocks < used  # its own blocks, freed at once
        stopped_at = len(deltas)
        assert deltas[-1] == scheduler_pb2.TokenDelta(
            seq_index=0, finish_reason=common_pb2.FINISH_REASON_STOP)
        while (plan := llm.scheduler.schedule()) is not None:
            await handle.send(plan)
            llm.scheduler.process(await handle.receive())
        later = deltas[stopped_at:]
        assert later and all(d.seq_index == 1 for d in later)
        assert sum(len(d.token_ids) for d in deltas if d.seq_index == 1) == 12
        assert later[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        llm.scheduler.stop("two", 1)  # finished already: nothing happens
        assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
        await handle.close()

    asyncio.run(run())


def test_abort_frees_blocks(make_llm):
    llm = make_llm()

    async def run() -> None:
        handle = llm.make_handle()
        deltas = []
        request = admit_request("victim", list(range(50, 90)), greedy(100, ignore_eos=True), 0,
                                llm.pool_limits, deltas.append)
        llm.scheduler.add(request)
        for _ in range(3):
            await handle.send(llm.scheduler.schedule())
            llm.scheduler.process(await handle.receive())
        assert deltas and llm.blocks.num_used_blocks > 0
        llm.scheduler.abort("victim")
        assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
        drop = llm.scheduler.schedule()  # tells the executor to drop its mirror
        assert list(drop.dropped_request_ids) == ["victim"] and not drop.work
        await handle.send(drop)
        assert not (await handle.receive()).error
        await handle.close()

    asyncio.run(run())


def test_every_step_of_an_engine_runs_on_its_one_step_thread(tiny_llama_dir, monkeypatch):
    """torch's OpenMP team belongs to the calling thread: the offline engine builds its model
    and runs every step on one thread, across generate calls (before, each call opened a thread
    of its own); and a closed engine says so."""
    import threading

    import pagedserve.entrypoints.offline

    threads = []  # the objects, not idents: a dead thread's ident is reused
    build = pagedserve.entrypoints.offline.build_runner

    def recording_build(*args, **kwargs):
        threads.append(threading.current_thread())
        return build(*args, **kwargs)
    monkeypatch.setattr(pagedserve.entrypoints.offline, "build_runner", recording_build)
    with LLM(str(tiny_llama_dir), max_num_seqs=4) as llm:
        step = llm._runner.step

        def recording_step(plan):
            threads.append(threading.current_thread())
            return step(plan)
        llm._runner.step = recording_step
        for _ in range(3):
            llm.generate([[1, 2, 3]], greedy(3))
    assert len(threads) > 3 and len(set(threads)) == 1
    assert threading.current_thread() not in threads
    with pytest.raises(RuntimeError, match="this LLM is closed"):
        llm.generate([[1, 2, 3]], greedy(3))


def test_a_refused_request_fails_the_offline_call_instead_of_hanging(tiny_llama_dir,
                                                                     monkeypatch):
    """The executor refusing a request (a plan it finds malformed) ends `generate` with the
    reason: the engine waits on the refusal too, not only on the request's last token."""
    import pagedserve.executor.runner as runner_module

    def refuse_all(plan, state, limits, vocab_size):
        return {w.request_id: "refused by the test" for w in plan.work}

    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01)
    monkeypatch.setattr(runner_module, "check_plan", refuse_all)
    with llm, pytest.raises(RuntimeError, match="refused request offline-0: refused by the "
                                                "test"):
        llm.generate([[5, 6, 7]], greedy(4))
