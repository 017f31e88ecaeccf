"""The model runner driven by step plans, against `transformers` on the same random weights, for
every model family: staggered arrival, chunked prefill, prefix-cache hits, forks with
copy-on-write, preemption by recompute, logprobs; and malformed plans that leave the executor
serving."""

import dataclasses
import pathlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve.executor.decode_graphs import DecodeGraphs, capture_decode_graphs, capture_sizes
from pagedserve.executor.draft_model import DraftModel
from pagedserve.executor.kv_cache import allocate_kv_cache
from pagedserve.executor.models import load_model
from pagedserve.executor.models.layers import bind_kernels
from pagedserve.executor.plan_checks import PlanError, RunnerLimits
from pagedserve.executor.runner import ModelRunner
from pagedserve.executor.speculative import SpeculativeConfig
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.dispatch import cpu_kernels as cpu_kernel_set
from pagedserve.testing.graphs import EagerCapture
from pagedserve.testing.tiny_models import (
    save_tiny_model,
    tiny_falcon_config,
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_gpt2_config,
    tiny_gpt_neox_config,
    tiny_mistral_config,
    tiny_mixtral_config,
    tiny_phi3_config,
    tiny_qwen2_config,
    tiny_qwen2_moe_config,
    tiny_qwen3_config,
    tiny_qwen3_moe_config,
)
from pagedserve.v1 import common_pb2, executor_pb2

BLOCK = 4
LIMITS = RunnerLimits(num_blocks=128, block_size=BLOCK, max_num_seqs=16,
                      max_num_batched_tokens=256, max_model_len=256, max_logprobs=5)
GREEDY = common_pb2.SamplingParams(temperature=0.0)
PROMPTS = [list(range(30, 31)), list(range(40, 45)), list(range(50, 59)), list(range(60, 80))]
NEW_TOKENS = 6


VOCAB = 300
# One variant per family beside LLaMA; windowed ones use a window (8) shorter than the prompts.
FAMILIES = {
    "mistral": lambda: tiny_mistral_config(VOCAB, sliding_window=8),
    "qwen2": lambda: tiny_qwen2_config(VOCAB, use_sliding_window=True),
    "qwen3": lambda: tiny_qwen3_config(VOCAB),
    "gpt-neox": lambda: tiny_gpt_neox_config(VOCAB),
    "falcon": lambda: tiny_falcon_config(VOCAB),
    "gpt2": lambda: tiny_gpt2_config(VOCAB),
    "mixtral": lambda: tiny_mixtral_config(VOCAB),
    "qwen3-moe": lambda: tiny_qwen3_moe_config(VOCAB),
    "qwen2-moe": lambda: tiny_qwen2_moe_config(VOCAB),
    "phi3": lambda: tiny_phi3_config(VOCAB, rope_parameters={
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    "gemma2": lambda: tiny_gemma2_config(VOCAB),
    "gemma3": lambda: tiny_gemma3_config(VOCAB),
}


@pytest.fixture(scope="module", params=["llama", *FAMILIES])
def model_dir(request, tiny_llama_dir, tmp_path_factory):
    if request.param == "llama":
        return tiny_llama_dir
    return save_tiny_model(tmp_path_factory.mktemp(request.param), FAMILIES[request.param]())


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_runner(directory, speculative: SpeculativeConfig | None = None,
                graphs: str | None = None) -> ModelRunner:
    """`graphs`: decode-only steps replay graphs (decode_graphs.py): "stand-in", captured by a
    CPU stand-in for CUDA's, of batch sizes 1, 2, 4 and 8, padded as on a GPU; "cpu", recorded
    CPU graphs of the C kernels, captured as the executor captures them (none for the MoE
    families, whose routing reads expert counts on the host: they run eagerly)."""
    model = load_model(directory, torch.float32)
    if graphs == "cpu":
        bind_kernels(model, cpu_kernel_set())
    allocate_kv_cache(model, LIMITS.num_blocks, BLOCK, torch.float32, torch.device("cpu"))
    limits = LIMITS if speculative is None else dataclasses.replace(
        LIMITS, max_lookahead_tokens=speculative.num_speculative_tokens)
    draft = None
    if speculative is not None and speculative.method == "draft_model":
        draft_model = load_model(pathlib.Path(speculative.model), torch.float32)
        allocate_kv_cache(draft_model, LIMITS.num_blocks, BLOCK, torch.float32,
                          torch.device("cpu"))
        draft = DraftModel(draft_model, BLOCK, torch.device("cpu"), model.config.vocab_size)
    decode_graphs = None
    if graphs == "stand-in":
        decode_graphs = DecodeGraphs(model, capture_sizes(8), LIMITS.max_model_len, BLOCK,
                                     torch.device("cpu"), EagerCapture())
    elif graphs == "cpu":
        decode_graphs = capture_decode_graphs(model, LIMITS.max_num_seqs, LIMITS.max_model_len,
                                              BLOCK, torch.device("cpu"))
        moe = hasattr(model.config, "num_experts") or hasattr(model.config, "num_local_experts")
        assert (decode_graphs is None) == moe
    return ModelRunner(model, limits, eos_token_ids=[2], device=torch.device("cpu"),
                       speculative=speculative, draft=draft, graphs=decode_graphs)


def self_draft(directory) -> SpeculativeConfig:
    """The model as its own draft (loaded twice: each copy has its own cache). Greedy, in
    float32, the target then accepts every proposal: a draft cache that lost or misplaced a
    token's K/V (after a chunk, a prefix hit, a fork's copy, a rejection) shows as a rejected
    proposal."""
    return SpeculativeConfig("draft_model", 3, model=str(directory))


@pytest.fixture(params=["plain", "self-draft", "graphs", "cpu-graphs"])
def runner(request, model_dir):
    """The runner without speculation, with the model as its own draft (its decodes then
    verify 3 proposals each), with decode graphs captured by a stand-in for CUDA's, and with
    CPU graphs of the C kernels."""
    if request.param == "cpu-graphs" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    graphs = {"graphs": "stand-in", "cpu-graphs": "cpu"}.get(request.param)
    return make_runner(model_dir, self_draft(model_dir) if request.param == "self-draft"
                       else None, graphs=graphs)


def hf_greedy(hf_model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


class MiniScheduler:
    """Plays the scheduler: allocates blocks, writes plans, reads results."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.free = list(range(LIMITS.num_blocks))[::-1]
        self.step_id = 0
        self.known: dict[str, int] = {}  # request id -> tokens known
        self.computed: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.results: list[executor_pb2.StepResult] = []
        # decode_all's proposals per decode: the most the runner verifies.
        self.lookahead = runner.limits.max_lookahead_tokens
        self.drafted = self.accepted = 0

    def new(self, rid, prompt, sampling=GREEDY, blocks=(), computed=0, fork_of="",
            num_prompt=None):
        self.known[rid] = len(prompt)
        self.computed[rid] = computed
        self.blocks[rid] = list(blocks)
        self.outputs.setdefault(rid, [])
        return executor_pb2.NewRequest(
            request_id=rid, token_ids=[] if fork_of else prompt, fork_of=fork_of,
            num_prompt_tokens=len(prompt) if num_prompt is None else num_prompt,
            sampling=sampling, block_ids=list(blocks), num_computed_tokens=computed)

    def work(self, rid, num_tokens, lookahead=0):
        """`lookahead`: proposals the decode may verify (slots allocated for them)."""
        needed = -(-(self.computed[rid] + num_tokens + lookahead) // BLOCK) - len(self.blocks[rid])
        new_blocks = [self.free.pop() for _ in range(max(0, needed))]
        self.blocks[rid] += new_blocks
        self.computed[rid] += num_tokens
        return executor_pb2.ScheduledWork(request_id=rid, num_tokens=num_tokens,
                                          new_block_ids=new_blocks,
                                          num_lookahead_tokens=lookahead)

    def step(self, new=(), work=(), dropped=(), copies=()):
        self.step_id += 1
        result = self.runner.execute(executor_pb2.StepPlan(
            step_id=self.step_id, new_requests=list(new), work=list(work),
            dropped_request_ids=list(dropped), block_copies=list(copies)))
        assert result.step_id == self.step_id and not result.error
        for output in result.outputs:
            self.outputs[output.request_id] += output.token_ids
            self.known[output.request_id] += len(output.token_ids)
            # Accepted proposals (all but the last token of a verifying decode) were computed.
            self.computed[output.request_id] += max(0, len(output.token_ids) - 1)
            self.accepted += max(0, len(output.token_ids) - 1)
        self.drafted += result.num_draft_tokens
        self.results.append(result)
        return result

    def decode_all(self, rids):
        return self.step(work=[self.work(r, 1, self.lookahead) for r in rids])

    def check_self_draft(self):
        """With the model as its own draft (greedy), every proposal was accepted; and the
        draft's cache trails the model's by one token at most (the draft does not recompute)."""
        if self.runner.draft is not None:
            assert self.accepted == self.drafted > 0
            for mirror in self.runner.requests.values():
                assert mirror.num_computed - 1 <= mirror.num_draft_cached <= mirror.num_computed


def test_staggered_arrivals_match_transformers(runner, hf_model):
    s = MiniScheduler(runner)
    rids = [f"r{i}" for i in range(len(PROMPTS))]
    # r0 and r1 start together; r2 joins on the next step, r3 two steps later.
    s.step(new=[s.new(r, p) for r, p in zip(rids[:2], PROMPTS[:2], strict=True)],
           work=[s.work(r, len(p)) for r, p in zip(rids[:2], PROMPTS[:2], strict=True)])
    s.step(new=[s.new("r2", PROMPTS[2])], work=[s.work("r0", 1), s.work("r1", 1),
                                                  s.work("r2", len(PROMPTS[2]))])
    s.decode_all(rids[:3])
    s.step(new=[s.new("r3", PROMPTS[3])],
           work=[*(s.work(r, 1) for r in rids[:3]), s.work("r3", len(PROMPTS[3]))])
    while any(len(s.outputs[r]) < NEW_TOKENS for r in rids):
        s.decode_all([r for r in rids if len(s.outputs[r]) < NEW_TOKENS])
    for rid, prompt in zip(rids, PROMPTS, strict=True):
        assert s.outputs[rid][:NEW_TOKENS] == hf_greedy(hf_model, prompt), rid
    s.check_self_draft()


def test_chunked_prefill_and_prefix_hit_give_the_same_tokens(runner, hf_model):
    prompt = PROMPTS[3]  # 20 tokens = 5 full blocks
    s = MiniScheduler(runner)
    # "a": prefill in chunks of 7, 7 and 6 tokens.
    s.step(new=[s.new("a", prompt)], work=[s.work("a", 7)])
    assert not s.results[-1].outputs  # a chunk that stops short samples nothing
    s.step(work=[s.work("a", 7)])
    s.step(work=[s.work("a", 6)])
    # "b": same prompt, its first 4 blocks (16 tokens) taken from "a" as a prefix-cache hit.
    shared = s.blocks["a"][:4]
    with_logprobs = common_pb2.SamplingParams(temperature=0.0, logprobs=0)
    s.step(new=[s.new("b", prompt, with_logprobs, blocks=shared, computed=16)],
           work=[s.work("a", 1), s.work("b", 4)])
    while len(s.outputs["b"]) < NEW_TOKENS:
        s.decode_all([r for r in ("a", "b") if len(s.outputs[r]) < NEW_TOKENS])
    expected = hf_greedy(hf_model, prompt)
    assert s.outputs["a"][:NEW_TOKENS] == expected
    assert s.outputs["b"][:NEW_TOKENS] == expected
    with torch.no_grad():
        reference = torch.log_softmax(
            hf_model(torch.tensor([prompt + expected])).logits[0], dim=-1)
    b_logprobs = [e.chosen.logprob for r in s.results for o in r.outputs
                  if o.request_id == "b" for e in o.logprobs]
    for i, logprob in enumerate(b_logprobs[:NEW_TOKENS]):
        assert logprob == pytest.approx(float(reference[len(prompt) - 1 + i, expected[i]]),
                                        abs=1e-4)
    s.check_self_draft()


def test_forks_share_the_prompt_and_copy_the_partial_block(runner, hf_model):
    prompt = PROMPTS[2]  # 9 tokens: 2 full blocks + 1 token in a partial third
    s = MiniScheduler(runner)
    with_logprobs = common_pb2.SamplingParams(temperature=0.0, logprobs=0)
    s.step(new=[s.new("p", prompt, with_logprobs)], work=[s.work("p", len(prompt))])
    # The fork shares the full blocks and gets a copy of the partial one.
    copy_dst = s.free.pop()
    fork = s.new("p.1", prompt + s.outputs["p"], fork_of="p",
                 blocks=s.blocks["p"][:2] + [copy_dst], computed=len(prompt))
    s.step(new=[fork], work=[s.work("p", 1), s.work("p.1", 1)],
           copies=[executor_pb2.BlockCopy(src_block_id=s.blocks["p"][2], dst_block_id=copy_dst)])
    while len(s.outputs["p.1"]) < NEW_TOKENS - 1:
        s.decode_all(["p", "p.1"])
    expected = hf_greedy(hf_model, prompt)
    assert s.outputs["p"][:NEW_TOKENS] == expected
    assert s.outputs["p.1"][:NEW_TOKENS - 1] == expected[1:]
    # Logprobs are continuous: they expose a fork that read a stale or missing block.
    with torch.no_grad():
        reference = torch.log_softmax(
            hf_model(torch.tensor([prompt + expected])).logits[0], dim=-1)
    fork_logprobs = [e.chosen.logprob for r in s.results for o in r.outputs
                     if o.request_id == "p.1" for e in o.logprobs]
    for i, logprob in enumerate(fork_logprobs[:NEW_TOKENS - 1], start=1):
        assert logprob == pytest.approx(float(reference[len(prompt) - 1 + i, expected[i]]),
                                        abs=1e-4)
    s.check_self_draft()


def test_preempted_request_recomputes_and_continues(runner, hf_model):
    prompt = PROMPTS[1]
    s = MiniScheduler(runner)
    s.step(new=[s.new("r", prompt)], work=[s.work("r", len(prompt))])
    s.decode_all(["r"])
    s.decode_all(["r"])
    generated = list(s.outputs["r"])
    s.free += s.blocks["r"]  # preempt: blocks freed, the mirror dropped
    known = prompt + generated
    s.step(dropped=["r"], new=[s.new("r", known, num_prompt=len(prompt))],
           work=[s.work("r", len(known))])
    while len(s.outputs["r"]) < NEW_TOKENS:
        s.decode_all(["r"])
    assert s.outputs["r"][:NEW_TOKENS] == hf_greedy(hf_model, prompt)
    s.check_self_draft()


def test_logprobs_and_prompt_logprobs_match_transformers(runner, hf_model):
    prompt = PROMPTS[2]
    s = MiniScheduler(runner)
    sampling = common_pb2.SamplingParams(temperature=0.0, logprobs=3, prompt_logprobs=2)
    s.step(new=[s.new("r", prompt, sampling)], work=[s.work("r", 5)])  # chunked prompt
    s.step(work=[s.work("r", 4)])
    s.decode_all(["r"])
    tokens = prompt + s.outputs["r"]
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0], dim=-1)

    prompt_entries = [e for r in s.results for o in r.outputs for e in o.prompt_logprobs]
    assert len(prompt_entries) == len(prompt)
    assert not prompt_entries[0].HasField("chosen")
    for pos, entry in enumerate(prompt_entries[1:], start=1):
        assert entry.chosen.token_id == prompt[pos]
        assert entry.chosen.logprob == pytest.approx(float(reference[pos - 1, prompt[pos]]),
                                                     abs=1e-4)
        assert [t.token_id for t in entry.top] == reference[pos - 1].topk(2).indices.tolist()

    sampled = [e for r in s.results for o in r.outputs for e in o.logprobs]
    # One token from the prompt's last chunk, one from the decode, and its accepted proposals.
    assert len(sampled) == len(s.outputs["r"]) == 2 + s.accepted
    for i, entry in enumerate(sampled):
        row = reference[len(prompt) - 1 + i]
        assert entry.chosen.token_id == s.outputs["r"][i] == int(row.argmax())
        assert entry.chosen.rank == 1
        assert entry.chosen.logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert [t.logprob for t in entry.top] == pytest.approx(row.topk(3).values.tolist(),
                                                               abs=1e-4)
    s.check_self_draft()


@pytest.mark.parametrize("pooling", [common_pb2.Pooling.TYPE_LAST, common_pb2.Pooling.TYPE_MEAN],
                         ids=["last", "mean"])
def test_pooling_and_prompt_logprobs_read_the_prompts_rows(runner, hf_model, pooling):
    """The prompt in chunks, its last token alone in a step that verifies proposals after it
    (with a draft): the pooled vector is transformers' final hidden states pooled, and the
    last prompt position's logprob is read at its row, not at a proposal's."""
    prompt = PROMPTS[3]
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0,
                                         pooling=common_pb2.Pooling(type=pooling))
    s = MiniScheduler(runner)
    s.step(new=[s.new("r", prompt, sampling)], work=[s.work("r", 7)])
    s.step(work=[s.work("r", len(prompt) - 8)])
    s.step(work=[s.work("r", 1, s.lookahead)])
    with torch.no_grad():
        hidden = hf_model.base_model(torch.tensor([prompt])).last_hidden_state[0]
        reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0], dim=-1)
    [embedding] = [list(o.embedding) for r in s.results for o in r.outputs if o.embedding]
    expected = hidden[-1] if pooling == common_pb2.Pooling.TYPE_LAST else hidden.mean(dim=0)
    assert embedding == pytest.approx(expected.tolist(), abs=1e-4)
    entries = [e for r in s.results for o in r.outputs for e in o.prompt_logprobs]
    assert [e.chosen.logprob for e in entries[1:]] == pytest.approx(
        [float(reference[q - 1, prompt[q]]) for q in range(1, len(prompt))], abs=1e-4)
    s.check_self_draft()


def _new(rid: str, tokens, blocks=(0,), **sampling) -> executor_pb2.NewRequest:
    return executor_pb2.NewRequest(request_id=rid, token_ids=tokens, num_prompt_tokens=len(tokens),
                                   block_ids=list(blocks),
                                   sampling=common_pb2.SamplingParams(**sampling))


# A request's part of a plan that the executor refuses, alone: (plan fields, refused request,
# message).
BAD_REQUESTS = {
    "unknown request": (dict(work=[executor_pb2.ScheduledWork(request_id="nope", num_tokens=1)]),
                        "nope", "work: unknown request 'nope'"),
    "block out of range": (dict(new_requests=[_new("x", [1, 2], [LIMITS.num_blocks])],
                                work=[executor_pb2.ScheduledWork(request_id="x", num_tokens=2)]),
                           "x", f"block id {LIMITS.num_blocks} out of range"),
    "too many tokens": (dict(new_requests=[_new("x", [1, 2])],
                             work=[executor_pb2.ScheduledWork(request_id="x", num_tokens=3)]),
                        "x", "num_tokens: 3, but the request has 2 uncomputed tokens"),
    "too few blocks": (dict(new_requests=[_new("x", list(range(9)))],
                            work=[executor_pb2.ScheduledWork(request_id="x", num_tokens=9)]),
                       "x", "1 blocks cannot hold 9 tokens"),
    "token out of vocabulary": (dict(new_requests=[_new("x", [10**6])]),
                                "x", "token id 1000000 out of the vocabulary"),
    "unknown drop": (dict(dropped_request_ids=["ghost"]), "ghost", "unknown request 'ghost'"),
    "logit bias out of vocabulary": (dict(new_requests=[_new("x", [1], logit_bias={10**6: 1.0})]),
                                     "x", "sampling.logit_bias: keys must be token ids below"),
    # Issue 17's poison request: it used to raise inside the sampler, costing the executor.
    "prompt logprobs over the limit": (
        dict(new_requests=[_new("x", [1, 2], prompt_logprobs=10**6)],
             work=[executor_pb2.ScheduledWork(request_id="x", num_tokens=2)]),
        "x", "sampling.prompt_logprobs: must be <= 5"),
    "NaN temperature": (dict(new_requests=[_new("x", [1, 2], temperature=float("nan"))],
                             work=[executor_pb2.ScheduledWork(request_id="x", num_tokens=2)]),
                        "x", "sampling.temperature: must be a finite number"),
    "fork of a refused request": (
        dict(new_requests=[_new("x", [10**6]),
                           executor_pb2.NewRequest(request_id="y", fork_of="x", block_ids=[1])]),
        "y", "fork_of: unknown request 'x'"),
    # A mean over positions it never computes would be wrong, silently.
    "mean pooling over a cached prefix": (
        dict(new_requests=[executor_pb2.NewRequest(
            request_id="x", token_ids=[1, 2, 3], num_prompt_tokens=3, block_ids=[0],
            num_computed_tokens=2, sampling=common_pb2.SamplingParams(
                pooling=common_pb2.Pooling(type=common_pb2.Pooling.TYPE_MEAN)))],
             work=[executor_pb2.ScheduledWork(request_id="x", num_tokens=1)]),
        "x", "a mean pooling needs every prompt position computed"),
    "pooling of n sequences": (
        dict(new_requests=[_new("x", [1, 2], n=2, pooling=common_pb2.Pooling(
            type=common_pb2.Pooling.TYPE_LAST))],
             work=[executor_pb2.ScheduledWork(request_id="x", num_tokens=2)]),
        "x", "sampling.pooling: needs n = 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_malformed_request_is_refused_alone_and_the_step_runs(tiny_llama_dir, case):
    """The request's part is refused with a message naming it; the request decoding in the
    same step gets its token, and its output still matches transformers."""
    runner = make_runner(tiny_llama_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    s = MiniScheduler(runner)
    s.step(new=[s.new("ok", PROMPTS[1])], work=[s.work("ok", len(PROMPTS[1]))])
    fields, refused, message = BAD_REQUESTS[case]
    s.step(new=fields.get("new_requests", ()), dropped=fields.get("dropped_request_ids", ()),
           work=[s.work("ok", 1), *fields.get("work", ())])
    failures = {f.request_id: f.message for f in s.results[-1].failed_requests}
    assert refused in failures and message in failures[refused], failures
    assert set(runner.requests) == {"ok"} and len(s.outputs["ok"]) == 2
    while len(s.outputs["ok"]) < NEW_TOKENS:
        s.decode_all(["ok"])
    assert s.outputs["ok"] == hf_greedy(hf_model, PROMPTS[1])


# Plans malformed as a whole (the scheduler's bug, no request's): refused with nothing applied.
BAD_PLANS = {
    "more requests than max_num_seqs": (
        dict(new_requests=[_new(f"x{i}", [1], [i]) for i in range(LIMITS.max_num_seqs + 1)],
             work=[executor_pb2.ScheduledWork(request_id=f"x{i}", num_tokens=1)
                   for i in range(LIMITS.max_num_seqs + 1)]),
        f"> max_num_seqs {LIMITS.max_num_seqs}"),
    "more tokens than the budget": (
        dict(new_requests=[_new("x", [1] * 200, range(50)), _new("y", [1] * 200, range(50, 100))],
             work=[executor_pb2.ScheduledWork(request_id=r, num_tokens=200) for r in "xy"]),
        f"400 tokens > max_num_batched_tokens {LIMITS.max_num_batched_tokens}"),
    "scheduled twice": (dict(new_requests=[_new("x", [1, 2])],
                             work=[executor_pb2.ScheduledWork(request_id="x", num_tokens=1)] * 2),
                        "request 'x' scheduled twice"),
    "block copy out of range": (dict(block_copies=[executor_pb2.BlockCopy(
        src_block_id=0, dst_block_id=LIMITS.num_blocks)]), "block_copies: block id"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_malformed_plans_are_rejected_without_side_effects(tiny_llama_dir, case):
    runner = make_runner(tiny_llama_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    s = MiniScheduler(runner)
    s.step(new=[s.new("ok", PROMPTS[1])], work=[s.work("ok", len(PROMPTS[1]))])
    fields, message = BAD_PLANS[case]
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runner.execute(executor_pb2.StepPlan(step_id=99, **fields))
    assert set(runner.requests) == {"ok"}
    while len(s.outputs["ok"]) < NEW_TOKENS:
        s.decode_all(["ok"])
    assert s.outputs["ok"] == hf_greedy(hf_model, PROMPTS[1])


# Speculative decoding at the runner (docs/speculative_decoding.md): n-gram or draft-model
# proposals verified in the decode's forward pass. A prompt that repeats itself, so that prompt
# lookup proposes.
REPEATING = [5, 6, 7, 8, 9] * 3 + [5, 6]
NGRAM = SpeculativeConfig("ngram", num_speculative_tokens=3, prompt_lookup_min=1,
                          prompt_lookup_max=3)


def speculative_run(runner: ModelRunner, sampling, lookahead: int, new_tokens: int = 48):
    """`new_tokens` (or a few more) generated one decode at a time, each verifying up to
    `lookahead` proposals; returns the scheduler, whose results hold the outputs."""
    s = MiniScheduler(runner)
    s.step(new=[s.new("r", REPEATING, sampling)], work=[s.work("r", len(REPEATING))])
    while len(s.outputs["r"]) < new_tokens:
        s.step(work=[s.work("r", 1, lookahead)])
    return s


@pytest.mark.parametrize("sampling", [
    GREEDY,
    # Low temperatures and mild penalties, so that the tiny random models still fall into the
    # loops that prompt lookup predicts.
    common_pb2.SamplingParams(temperature=0.1, seed=7, logprobs=2),
    # Penalties and min_tokens see the proposals before each position.
    common_pb2.SamplingParams(temperature=0.1, seed=3, repetition_penalty=1.02,
                              presence_penalty=0.05, min_tokens=12),
], ids=["greedy", "seeded", "seeded-penalties"])
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_verified_proposals_give_the_tokens_decoding_gives(model_dir, sampling, method):
    """Greedy and seeded sequences draw each position's token as without speculation: the
    tokens, and their logprobs, are the same; and proposals were accepted (steps returned
    several tokens), so the comparison covers verification. The draft model is the model
    itself (its argmax proposals then meet seeded draws at temperature 0.1 too)."""
    plain = speculative_run(make_runner(model_dir), sampling, lookahead=0)
    spec = speculative_run(make_runner(model_dir, NGRAM if method == "ngram"
                                       else self_draft(model_dir)), sampling, lookahead=3)
    n = min(len(plain.outputs["r"]), len(spec.outputs["r"]))
    assert spec.outputs["r"][:n] == plain.outputs["r"][:n]
    assert max(len(o.token_ids) for r in spec.results for o in r.outputs) > 1
    assert len(spec.results) < len(plain.results)
    # The logprobs of the same tokens, to float rounding (a verifying decode runs its
    # positions as a multi-token query, not the one-token decode path).
    ids, lps = zip(*[([e.chosen.token_id for e in entries], [e.chosen.logprob for e in entries])
                     for entries in ([e for r in run.results for o in r.outputs
                                      for e in o.logprobs][:n] for run in (plain, spec))],
                   strict=True)
    assert ids[0] == ids[1]
    assert lps[1] == pytest.approx(lps[0], abs=1e-4)


def test_a_draft_model_unlike_the_model_changes_no_token(model_dir, tmp_path):
    """Another model of the family (one layer, other weights) proposes what the model rarely
    draws: greedy and seeded outputs stay the model's own, proposal after rejected proposal."""
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):  # Qwen2's per-layer attention kinds
        config.layer_types = config.layer_types[:1]
    draft = SpeculativeConfig("draft_model", 3, model=str(save_tiny_model(tmp_path, config, 1)))
    for sampling in (GREEDY, common_pb2.SamplingParams(temperature=0.8, seed=11)):
        plain = speculative_run(make_runner(model_dir), sampling, lookahead=0, new_tokens=24)
        spec = speculative_run(make_runner(model_dir, draft), sampling, lookahead=3,
                               new_tokens=24)
        assert spec.drafted > spec.accepted
        assert spec.outputs["r"][:24] == plain.outputs["r"][:24]


@pytest.mark.parametrize("prompt, max_tokens, blocks, model_len, expected", [
    (REPEATING, None, 6, 256, [7, 8, 9]),  # the budget, 3, of what followed the last "5 6"
    (REPEATING, 3, 6, 256, [7, 8]),  # 3 tokens to go: 2 proposals, then the token after them
    (REPEATING, 1, 6, 256, []),
    (REPEATING + [7], None, 5, 256, [8, 9]),  # 20 slots for 18 known tokens: 2 proposals
    (REPEATING + [7, 8, 9], None, 5, 256, []),  # no slot left
    (REPEATING, None, 6, len(REPEATING) + 2, [7]),  # 1 proposal, then the token after it
])
def test_proposals_stay_within_max_tokens_the_blocks_and_the_model_length(
        tiny_llama_dir, prompt, max_tokens, blocks, model_len, expected):
    runner = make_runner(tiny_llama_dir, NGRAM)
    runner.limits = dataclasses.replace(runner.limits, max_model_len=model_len)
    s = MiniScheduler(runner)
    sampling = common_pb2.SamplingParams(temperature=0.0)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    # All but the last token cached: the next step decodes it.
    s.step(new=[s.new("r", prompt, sampling, blocks=range(blocks), computed=len(prompt) - 1)])
    work = executor_pb2.ScheduledWork(request_id="r", num_tokens=1, num_lookahead_tokens=3)
    assert runner._propose([work]).get("r", []) == expected


@pytest.mark.parametrize("work, error", [
    (executor_pb2.ScheduledWork(request_id="r", num_tokens=2, num_lookahead_tokens=1),
     "only a decode of the request's last known token"),
    (executor_pb2.ScheduledWork(request_id="r", num_tokens=1, num_lookahead_tokens=4),
     "num_lookahead_tokens: 4 > this executor's 3"),
])
def test_lookahead_the_executor_cannot_verify_is_refused(tiny_llama_dir, work, error):
    runner = make_runner(tiny_llama_dir, NGRAM)
    s = MiniScheduler(runner)
    s.step(new=[s.new("r", REPEATING[:6], blocks=[0, 1, 2, 3])], work=[s.work("r", 4)])
    result = runner.execute(executor_pb2.StepPlan(step_id=9, work=[work]))
    assert [f.request_id for f in result.failed_requests] == ["r"]
    assert error in result.failed_requests[0].message


def test_an_executor_without_speculation_refuses_lookahead(tiny_llama_dir):
    runner = make_runner(tiny_llama_dir)
    s = MiniScheduler(runner)
    s.step(new=[s.new("r", REPEATING[:4], blocks=[0, 1])], work=[s.work("r", 4)])
    result = runner.execute(executor_pb2.StepPlan(step_id=9, work=[
        executor_pb2.ScheduledWork(request_id="r", num_tokens=1, num_lookahead_tokens=1)]))
    assert "num_lookahead_tokens: 1 > this executor's 0" in result.failed_requests[0].message
