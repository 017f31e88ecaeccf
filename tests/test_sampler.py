"""The batched sampler against references written from the definitions (float64, loops over a
tiny vocabulary) and hand-computed values. Random draws use fixed seeds, so nothing is flaky."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pagedserve.executor.sampler import (
    Sampler,
    SequenceSamplingState,
    _apply_top_k_top_p,
    _mix64,
    draw_seed,
    process_logits,
    prompt_logprobs,
    sequence_seed,
)
from pagedserve.v1 import common_pb2

EOS = 5
sample = Sampler()


@pytest.fixture(autouse=True)
def fixed_global_rng():
    """Unseeded rows draw from the global generator: seed it, and restore it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        yield


def seq(prompt=(0, 1), output=(), eos=(EOS,), seq_index=0, **params) -> SequenceSamplingState:
    p = common_pb2.SamplingParams(**params)
    return SequenceSamplingState(params=p, prompt_token_ids=list(prompt),
                                 output_token_ids=list(output), eos_token_ids=tuple(eos),
                                 seed=sequence_seed(p, seq_index))


def draws(logits: list[float], n: int, **params) -> torch.Tensor:
    """n samples from one row of logits: one batch of n identical unseeded rows."""
    rows = torch.tensor([logits]).expand(n, -1)
    return sample(rows, [seq(**params) for _ in range(n)]).token_ids


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """The distribution the sampler should draw from, by the definitions, in float64."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = order[:top_k] if top_k > 0 else order
    if top_p < 1.0:
        kept_mass = sum(probs[i] for i in keep)
        nucleus, mass = [], 0.0
        for i in keep:
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += probs[i] / kept_mass
        keep = nucleus
    keep = [i for i in keep if probs[i] >= min_p * max(probs)]
    kept_mass = sum(probs[i] for i in keep)
    return [probs[i] / kept_mass if i in keep else 0.0 for i in range(len(probs))]


def total_variation(p, q) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


def empirical(tokens: torch.Tensor, vocab: int) -> list[float]:
    return (torch.bincount(tokens, minlength=vocab).double() / len(tokens)).tolist()


def test_greedy_is_argmax_of_every_row():
    logits = torch.randn(8, 50)
    seqs = [seq(temperature=t) for t in (0.0, 1e-6, 0.0, 0.0, 1e-7, 0.0, 0.0, 0.0)]
    assert torch.equal(sample(logits, seqs).token_ids, logits.argmax(dim=-1))


def test_greedy_rows_in_a_mixed_batch_stay_argmax():
    logits = torch.randn(6, 50)
    seqs = [seq(temperature=0.0 if i % 2 else 1.5, top_p=0.5, top_k=3, min_p=0.3)
            for i in range(6)]
    tokens = sample(logits, seqs).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))


def test_greedy_batch_draws_no_random_numbers():
    logits = torch.randn(4, 30)
    state = torch.get_rng_state()
    sample(logits, [seq(temperature=0.0) for _ in range(4)])
    assert torch.equal(torch.get_rng_state(), state)


LOGITS = [2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0]
# Every truncation parameter at its "disabled" value: plain softmax sampling.
DISABLED = dict(top_k=-1, top_p=1.0, min_p=0.0, temperature=1.0)


@pytest.mark.parametrize("params", [
    dict(temperature=0.7),
    dict(temperature=2.0, top_p=0.8),
    dict(top_k=3),
    dict(temperature=0.5, top_k=3),
    dict(temperature=1.5, top_k=5, top_p=0.9, min_p=0.2),
    dict(min_p=0.3),
    # Top-k on top-p's sort: the k-th token stays (the nucleus needs both).
    dict(top_k=2, top_p=0.95),
    DISABLED,
])
def test_empirical_distribution_matches_reference(params):
    expected = reference_probs(LOGITS, **params)
    tokens = draws(LOGITS, 20000, **params)
    got = empirical(tokens, len(LOGITS))
    assert all(g == 0.0 for g, e in zip(got, expected, strict=True) if e == 0.0)
    # Sampling noise at 20000 draws is about 0.005 here; a misapplied parameter moves the
    # distribution much further (the second assertion shows this test could tell).
    assert total_variation(got, expected) < 0.02
    if params is not DISABLED:
        assert total_variation(expected, reference_probs(LOGITS)) > 0.05


def test_top_k_never_leaves_the_top_k():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))[0].tolist()
    allowed = set(torch.tensor(logits).topk(4).indices.tolist())
    tokens = set(draws(logits, 5000, temperature=3.0, top_k=4).tolist())
    assert tokens == allowed


def test_top_p_never_leaves_the_nucleus():
    # Probabilities .5, .25, .15, .06, .04: .5 + .25 < .8 <= .5 + .25 + .15.
    logits = [math.log(p) for p in (0.25, 0.06, 0.5, 0.04, 0.15)]
    assert set(draws(logits, 5000, top_p=0.8).tolist()) == {0, 2, 4}


def test_min_p_drops_unlikely_tokens():
    # min_p .15 of the top .5 is .075: .1 stays, .06 and .04 go.
    logits = [math.log(p) for p in (0.06, 0.3, 0.5, 0.04, 0.1)]
    assert set(draws(logits, 5000, min_p=0.15).tolist()) == {1, 2, 4}


def run_seeded(rows: list[tuple[torch.Tensor, dict]], steps: int) -> list[list[int]]:
    """Tokens of each row over steps (each step appends to the outputs, as the runner does)."""
    seqs = [seq(**params) for _, params in rows]
    logits = torch.stack([row for row, _ in rows])
    history = [[] for _ in rows]
    for _ in range(steps):
        for i, token in enumerate(sample(logits, seqs).token_ids.tolist()):
            history[i].append(token)
            seqs[i].output_token_ids.append(token)
    return history


def test_seeded_tokens_do_not_depend_on_the_batch():
    flat = torch.zeros(200)
    other = torch.randn(200)
    alone = run_seeded([(flat, dict(seed=42))], steps=5)[0]
    first = run_seeded([(flat, dict(seed=42)), (other, dict()), (other, dict(temperature=0.0)),
                        (other, dict(seed=7, top_k=10))], steps=5)[0]
    last = run_seeded([(other, dict(seed=3, top_p=0.5)), (other, dict(temperature=2.0)),
                       (flat, dict(seed=42))], steps=5)[-1]
    assert alone == first == last
    assert len(set(alone)) > 1  # really random: a constant would pass trivially


def test_different_seeds_give_different_tokens():
    flat = torch.zeros(1000)
    a, b = run_seeded([(flat, dict(seed=1)), (flat, dict(seed=2))], steps=5)
    assert a != b


def test_sequence_seed_is_seed_plus_index():
    assert sequence_seed(common_pb2.SamplingParams(), 0) is None
    assert sequence_seed(common_pb2.SamplingParams(seed=5), 2) == 7
    assert sequence_seed(common_pb2.SamplingParams(seed=2**64 - 1), 1) == 0  # wraps at 2**64


def test_sequences_of_one_request_draw_apart():
    """Sequence 1 is keyed by seed + 1 and sequence 0 by seed: with keys and positions merely
    added, sequence 1 would draw what sequence 0 draws one position on."""
    flat = torch.zeros(1000)
    a, b = run_seeded([(flat, dict(seed=9)), (flat, dict(seed=9, seq_index=1))], steps=6)
    assert a != b and a[1:] != b[:-1] and a[:-1] != b[1:]


def test_a_recomputed_sequence_samples_what_it_would_have():
    """A seeded draw depends on (seed, index, position) only: a sequence rebuilt at any step,
    its output so far as output (a preemption or a lost executor) or folded into its prompt (a
    resubmission after a scheduler restart), samples the token the undisturbed run sampled
    there; the continuing run is the reference."""
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(5))
    params = dict(seed=11, seq_index=2, temperature=1.3)
    [history] = run_seeded([(logits[0], params)], steps=8)
    assert len(set(history)) > 1  # really random: a constant would pass trivially
    for step in range(8):
        for rebuilt in (seq(output=history[:step], **params),
                        seq(prompt=[0, 1, *history[:step]], **params)):
            assert sample(logits, [rebuilt]).token_ids.item() == history[step], step


def test_seeded_draws_over_positions_and_seeds_match_reference():
    """The counter-based stream is well distributed along positions of one seed and across
    seeds at one position (neighbouring keys must not give related draws)."""
    params = dict(temperature=1.5, top_k=6)
    expected = reference_probs(LOGITS, **params)
    rows, steps = 200, 100
    # Row r samples positions 100 r .. 100 r + 99: 20000 distinct positions of one seed.
    along = [seq(prompt=range(steps * r), seed=3, **params) for r in range(rows)]
    across = [seq(seed=s, **params) for s in range(rows * steps)]
    logits = torch.tensor([LOGITS])
    tokens = []
    for _ in range(steps):
        step = sample(logits.expand(rows, -1), along).token_ids
        tokens.append(step)
        for s, token in zip(along, step.tolist(), strict=True):
            s.output_token_ids.append(token)
    for drawn in (torch.cat(tokens), sample(logits.expand(rows * steps, -1), across).token_ids):
        assert total_variation(empirical(drawn, len(LOGITS)), expected) < 0.02


def test_fully_seeded_batch_leaves_the_global_generator_alone():
    logits = torch.randn(3, 30)
    state = torch.get_rng_state()
    sample(logits, [seq(seed=i) for i in range(3)])
    assert torch.equal(torch.get_rng_state(), state)


def test_penalties_change_exactly_the_right_logits():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, -0.5, 3.0]] * 4)
    prompt, output = [0, 2], [2, 3, 3, 5]
    seqs = [
        seq(prompt, output, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        seq(prompt, output),
        seq(prompt, output, repetition_penalty=2.0),
        seq(prompt, output, presence_penalty=-1.0, frequency_penalty=0.5),
    ]
    expected = torch.tensor([
        # Repetition over prompt + output {0, 2, 3, 5}; presence/frequency over output counts
        # {2: 1, 3: 2, 5: 1}.
        [1.0 / 2, 2.0, -1.0 * 2 - 0.5 - 0.25, 0.5 / 2 - 0.5 - 0.5, -0.5, 3.0 / 2 - 0.5 - 0.25],
        [1.0, 2.0, -1.0, 0.5, -0.5, 3.0],
        [0.5, 2.0, -2.0, 0.25, -0.5, 1.5],
        [1.0, 2.0, -1.0 + 1.0 - 0.5, 0.5 + 1.0 - 1.0, -0.5, 3.0 + 1.0 - 0.5],
    ])
    torch.testing.assert_close(process_logits(logits, seqs), expected)
    for s in seqs:
        s.params.temperature = 0.0
    assert sample(logits, seqs).token_ids.tolist() == [1, 5, 1, 5]


def test_logit_bias_steers_greedy():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    seqs = [seq(temperature=0.0, logit_bias={3: 3.5}), seq(temperature=0.0),
            seq(temperature=0.0, logit_bias={0: -1.5, 2: 0.5})]
    assert sample(logits, seqs).token_ids.tolist() == [3, 0, 1]
    torch.testing.assert_close(process_logits(logits, seqs)[2], torch.tensor([1.5, 2, 1.5, 0]))


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    # EOS (5) is most likely, then stop id 7, then 2.
    logits = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.0, 2.0]] * 5)
    seqs = [seq(output=[], min_tokens=2, stop_token_ids=[7], temperature=0.0),
            seq(output=[4], min_tokens=2, stop_token_ids=[7], temperature=0.0),
            seq(output=[4, 4], min_tokens=2, stop_token_ids=[7], temperature=0.0),
            seq(output=[], min_tokens=2, stop_token_ids=[7], temperature=0.0, ignore_eos=True),
            seq(output=[], min_tokens=2, stop_token_ids=[7], temperature=0.0, eos=(5, 2))]
    assert sample(logits, seqs).token_ids.tolist() == [2, 2, 5, 5, 0]
    masked = torch.isinf(process_logits(logits, seqs))
    assert [row.nonzero().flatten().tolist() for row in masked] == [[5, 7], [5, 7], [], [7],
                                                                   [2, 5, 7]]


def test_min_tokens_holds_for_random_rows_too():
    logits = [0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 5.0]
    tokens = set(draws(logits, 2000, min_tokens=1, stop_token_ids=[7]).tolist())
    assert tokens == {0, 1, 2, 3, 4, 6}


def test_logprobs_are_raw_model_logprobs():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    # Processing that would change processed logprobs must not change the reported ones.
    seqs = [seq(logprobs=3, temperature=0.5, logit_bias={1: 4.0}, repetition_penalty=1.5),
            seq(),
            seq(logprobs=0, top_k=2),
            seq(logprobs=1, temperature=0.0, presence_penalty=2.0, output=[7])]
    out = sample(logits, seqs)
    reference = torch.log_softmax(logits.double(), dim=-1)
    tokens = out.token_ids
    torch.testing.assert_close(out.logprobs.double(), reference[torch.arange(4), tokens])
    ranks = [(reference[i].argsort(descending=True) == tokens[i]).nonzero().item() + 1
             for i in range(4)]
    assert out.ranks.tolist() == ranks
    assert out.top_ids.shape == (4, 3)
    top = reference.sort(dim=-1, descending=True)
    assert torch.equal(out.top_ids, top.indices[:, :3])
    torch.testing.assert_close(out.top_logprobs.double(), top.values[:, :3])


def test_logprobs_absent_unless_asked_and_zero_alternatives():
    logits = torch.randn(2, 10)
    none = sample(logits, [seq(), seq(temperature=0.0)])
    assert (none.logprobs, none.ranks, none.top_ids, none.top_logprobs) == (None,) * 4
    only_chosen = sample(logits, [seq(logprobs=0), seq()])
    assert only_chosen.top_ids.shape == only_chosen.top_logprobs.shape == (2, 0)
    assert only_chosen.logprobs.shape == (2,)


def test_prompt_logprobs_match_reference():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(4))
    next_ids = torch.tensor([3, 0, 29, 7, 7, 12])
    chosen, ranks, top_ids, top_logprobs = prompt_logprobs(logits, next_ids, 5)
    reference = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(chosen.double(), reference[torch.arange(6), next_ids])
    assert ranks.tolist() == [int((reference[i] > reference[i, t]).sum()) + 1
                              for i, t in enumerate(next_ids.tolist())]
    top = reference.sort(dim=-1, descending=True)
    assert torch.equal(top_ids, top.indices[:, :5])
    torch.testing.assert_close(top_logprobs.double(), top.values[:, :5])


def test_input_logits_are_left_unchanged():
    logits = torch.randn(3, 20)
    before = logits.clone()
    sample(logits, [seq(temperature=0.5, top_p=0.5, repetition_penalty=2.0,
                        logit_bias={1: 5.0}, min_tokens=3) for _ in range(3)])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("params, output", [
    (dict(logit_bias={1: 10.0}), ()),
    (dict(min_tokens=3), ()),
    (dict(repetition_penalty=4.0), (0,)),
    (dict(presence_penalty=2.0), (0,)),
    (dict(frequency_penalty=2.0), (0,)),
    # Each penalty at the value another one is disabled at: still a change.
    (dict(repetition_penalty=2.0), (0,)),
    (dict(presence_penalty=1.0), (0,)),
    (dict(frequency_penalty=1.0), (0,)),
])
def test_each_logit_change_reaches_an_all_greedy_batch(params, output):
    """A batch of greedy rows whose only change is one of these takes the processed argmax,
    not the raw one (plain greedy batches skip processing altogether)."""
    logits = torch.tensor([[3.0, 2.5, -1.0, -2.0]])  # raw argmax: token 0 (= EOS below)
    state = seq(prompt=(3,), output=output, eos=(0,), temperature=0.0, **params)
    assert sample(logits, [state]).token_ids.tolist() == [1]


def test_min_p_one_keeps_exactly_the_tokens_as_likely_as_the_top_one():
    """min_p drops probability < min_p * top (strictly less): at min_p 1 the ties with the top
    token stay, the rest go."""
    assert set(draws([1.0, 3.0, 3.0, 2.9], 2000, min_p=1.0).tolist()) == {1, 2}


def test_min_p_threshold_is_each_rows_own():
    """The threshold is relative to the row's own top token, not the batch's."""
    high = [10.0, 9.0, 0.0, -5.0]  # probabilities relative to the top: 1, .37, 5e-5, 3e-7
    low = [0.0, -1.0, -10.0, -15.0]  # the same shape, 10 lower
    logits = torch.tensor([high, low] * 1000)
    tokens = sample(logits, [seq(min_p=0.2) for _ in range(2000)]).token_ids
    assert set(tokens[0::2].tolist()) == set(tokens[1::2].tolist()) == {0, 1}


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p():
    """Four equally likely tokens (exactly .25 each in float32): top_p .5 is reached by two, so
    the third, with exactly .5 before it, goes (the smallest set with mass >= top_p)."""
    tokens = draws([0.0] * 4, 2000, top_p=0.5)
    assert len(set(tokens.tolist())) == 2
    assert total_variation(empirical(tokens, 4), reference_probs([0.0] * 4, top_p=0.5)) < 0.03


def test_top_p_one_keeps_a_tail_the_cumulative_sum_rounds_past():
    """Row 0's top token has probability 1 - 4e-9, which float32 rounds to 1: its cumulative
    mass reaches top_p 1 before the tail, yet top_p 1 must keep every token (row 1, with
    top_p < 1, makes the batch take the top-p path)."""
    logits = torch.tensor([[0.0, -20.0, -20.0], [0.0, -20.0, -20.0]])
    _apply_top_k_top_p(logits, [0, 0], [1.0, 0.5])
    assert logits[0].tolist() == [0.0, -20.0, -20.0]
    assert logits[1].tolist() == [0.0, -math.inf, -math.inf]


def test_top_k_in_a_batch_smaller_than_k():
    """top_k is bounded by the vocabulary, not by the number of rows; top_k 1 is the argmax, and
    a batch whose only top-k row has k = 1 leaves its other rows alone."""
    logits = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]] * 2)
    top1, top3, free = set(), set(), set()
    for _ in range(150):
        a, b = sample(logits, [seq(top_k=1, temperature=5.0), seq(temperature=5.0)]).token_ids
        c, _ = sample(logits, [seq(top_k=3, temperature=5.0), seq()]).token_ids
        top1.add(a.item())
        free.add(b.item())
        top3.add(c.item())
    assert (top1, top3, free) == ({0}, {0, 1, 2}, set(range(8)))


def test_presence_and_frequency_penalties_of_exactly_one():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]] * 2)
    seqs = [seq(output=[1, 3, 3], presence_penalty=1.0),
            seq(output=[1, 3, 3], frequency_penalty=1.0)]
    expected = torch.tensor([[1.0, 1.0, -1.0, -0.5], [1.0, 1.0, -1.0, -1.5]])
    torch.testing.assert_close(process_logits(logits, seqs), expected)


def test_changes_with_nothing_to_index_leave_the_logits_alone():
    """A presence penalty before any output, and min_tokens with EOS ignored and no stop ids,
    have no token to act on."""
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]] * 3)
    seqs = [seq(presence_penalty=1.5, frequency_penalty=0.5),
            seq(min_tokens=4, ignore_eos=True),
            seq(min_tokens=4, eos=())]
    assert torch.equal(process_logits(logits, seqs), logits)
    for s in seqs:
        s.params.temperature = 0.0
    assert sample(logits, seqs).token_ids.tolist() == [1, 1, 1]


def test_plain_greedy_batch_reports_logprobs():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(6))
    out = sample(logits, [seq(temperature=0.0, logprobs=2) for _ in range(3)])
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.ranks.tolist() == [1, 1, 1]
    torch.testing.assert_close(out.logprobs.double(), reference.max(dim=-1).values)
    torch.testing.assert_close(out.top_logprobs.double(), reference.topk(2).values)


def test_bfloat16_logits_are_processed_and_reported_in_float32():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(7)).bfloat16()
    processed = process_logits(logits, [seq() for _ in range(3)])
    assert processed.dtype == torch.float32
    assert torch.equal(processed, logits.float())
    next_ids = torch.tensor([4, 0, 29])
    chosen, _, _, top_logprobs = prompt_logprobs(logits, next_ids, 3)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert chosen.dtype == top_logprobs.dtype == torch.float32
    torch.testing.assert_close(chosen.double(), reference[torch.arange(3), next_ids])
    torch.testing.assert_close(top_logprobs.double(), reference.topk(3).values)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.bfloat16])
def test_processing_does_not_depend_on_torchs_default_dtype(default_dtype):
    """A model loader may set torch's default dtype to the model's (vLLM's does): the sampler's
    own tensors (biases, penalties, counts) must still be float32, as the logits are."""
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=torch.float32)
    state = seq(prompt=[0], output=[2, 3, 3], logit_bias={1: 0.3}, repetition_penalty=1.3,
                presence_penalty=0.3, frequency_penalty=0.3)
    # Bias on token 1; repetition over {0, 2, 3}; presence/frequency over {2: 1, 3: 2}.
    expected = [1.0 / 1.3, 2.0 + 0.3, -1.0 * 1.3 - 0.3 - 0.3, 0.5 / 1.3 - 0.3 - 2 * 0.3]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        processed = process_logits(logits, [state])
    finally:
        torch.set_default_dtype(previous)
    torch.testing.assert_close(processed, torch.tensor([expected], dtype=torch.float32))


class OneDevicePerOp(TorchDispatchMode):
    """Fails any operation whose (non-scalar) tensors are on more than one device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and t.dim() > 0}
        assert len(devices) <= 1, f"{func} mixes {devices}"
        return func(*args, **kwargs)


def test_every_operation_stays_on_the_logits_device():
    """On an accelerator, every tensor the sampler makes must be on the logits' device (a stray
    CPU tensor fails there, or costs a copy per operation). The CPU-only tests use the meta
    device (shapes, no data) as the accelerator; seeded rows are left out, as meta has no
    generator."""
    full = dict(temperature=0.8, top_k=3, top_p=0.9, min_p=0.1, logit_bias={1: 2.0},
                min_tokens=5, stop_token_ids=[2], repetition_penalty=1.3,
                presence_penalty=0.5, frequency_penalty=0.2, logprobs=2)
    batches = [
        [seq(output=(1, 2), **full), seq(temperature=0.0, logit_bias={2: 1.0}), seq(top_k=2),
         seq(min_p=0.2)],
        [seq(top_k=2), seq(temperature=0.0, presence_penalty=1.0, output=(3,)), seq(), seq()],
        [seq(temperature=0.0, logprobs=1) for _ in range(4)],
    ]
    logits = torch.empty(4, 10, device="meta")
    with OneDevicePerOp():
        for seqs, asks_logprobs in zip(batches, [True, False, True], strict=True):
            out = sample(logits, seqs)
            assert out.token_ids.device == logits.device and out.token_ids.shape == (4,)
            assert (out.top_ids is not None) == asks_logprobs
            if asks_logprobs:
                assert out.top_ids.device == logits.device


def test_draw_seed_is_splitmix64s_finalizer_applied_twice():
    """The mixer against SplitMix64's published outputs (its state advances by the golden gamma
    and each output is the finalizer of the state)."""
    gamma, mask = 0x9E3779B97F4A7C15, 2**64 - 1

    def outputs(seed: int, n: int) -> list[int]:
        return [_mix64((seed + i * gamma) & mask) for i in range(1, n + 1)]

    assert outputs(0, 2) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert outputs(1234567, 5) == [6457827717110365317, 3203168211198807973,
                                   9817491932198370423, 4593380528125082431,
                                   16408922859458223821]
    # draw_seed(seed, position) = mix(mix(seed) ^ position): with seed gamma, the position that
    # turns mix(gamma) into 2 gamma gives mix(2 gamma).
    assert draw_seed(gamma, 0xE220A8397B1DCDAF ^ (2 * gamma & mask)) == 0x6E789E6AA1B965F4
