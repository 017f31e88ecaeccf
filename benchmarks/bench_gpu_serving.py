"""GPU serving at the hardware's limit (issue 23): decode steps replayed from CUDA graphs against
eager ones, beside the streaming bound; host synchronisations in a step; greedy tokens with and
without graphs; end to end; and a peer on the same card.

    # on the lent GPU machine, from the source tree (nothing can be installed there):
    PYTHONPATH=.:proto:gateway:scheduler_svc:executor_svc:kernels \\
        python3 benchmarks/bench_gpu_serving.py --out $OUT [--only steps,greedy,syncs]
    python benchmarks/bench_gpu_serving.py --smoke --out /tmp/gpu-smoke   # CPU, tiny shapes

Sections (`--only` picks some; each one's figures are written to <out>/results.json as soon as
it ends, and a section that fails records its error and the next one runs):

- info: the device as it reports itself (nvidia-smi, driver), torch, triton and CUDA versions,
  and whether vllm or sglang can be imported.
- steps: the decode step of a LLaMA-3-8B-shaped model and of the default model's shape
  (SmolLM2-135M; random bf16 weights, which time like real ones) at batch 1, 16, 64 and 256,
  context 1k, with graphs and eagerly, alternated. Each step is the executor's whole step
  (`ModelRunner.execute` of a plan: batch, forward pass, logits, greedy sampling, the tokens'
  read). Each figure stands beside the streaming bound: bytes of weights and K/V read per step
  over the device-to-device copy bandwidth (bytes read + written per second), measured in the
  same run. And beside the share of the step the GPU was idle: 1 - the kernels' time in a
  profiled step (torch.profiler) over the unprofiled step time.
- greedy: the default model's shape in float32, 11 prompts decoding until each stops at its
  own length, so that batches shrink through padded sizes: the tokens with graphs must equal
  the eager ones. bfloat16's agreement is reported.
- syncs: the host synchronisations inside a decode step, counted by
  torch.cuda.set_sync_debug_mode (one expected: the read of the sampled tokens), for a greedy
  step and for one that samples with temperature, top-p and a penalty.
- quantized (issue 19): the 8B shape's decode steps with fp8 weights (--quantization fp8),
  beside the bf16 ones of `steps`.
- e2e: `pagedserve bench throughput` on a fixed random workload (256 requests, 1k-token prompts,
  256 output tokens) with graphs and with --enforce-eager, for each model shape saved as a
  random checkpoint; and `pagedserve bench serve` over HTTP against `pagedserve up` for the
  small one.
- peer: the same workload through `vllm bench throughput`, when the image has vllm.

--smoke runs every section on tiny shapes on the CPU, the graphs through the test suite's
stand-in capture (pagedserve.testing.graphs), so that the tests keep this script working
between the sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

from pagedserve.executor.decode_graphs import DecodeGraphs, capture_sizes, cuda_capture
from pagedserve.executor.kv_cache import allocate_kv_cache
from pagedserve.executor.models.layers import bind_kernels, quantize_linears, weight_bytes
from pagedserve.executor.models.llama import LlamaForCausalLM
from pagedserve.executor.parallel import SINGLE
from pagedserve.executor.plan_checks import RunnerLimits
from pagedserve.executor.runner import ModelRunner
from pagedserve.kernels.dispatch import TORCH_KERNELS, triton_kernels
from pagedserve.kernels.quantization import fp8_supported
from pagedserve.testing.graphs import EagerCapture
from pagedserve.v1 import common_pb2, executor_pb2

# LLaMA-3-8B's shape, and the default model's (SmolLM2-135M-Instruct).
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         rope_theta=100000.0, tie_word_embeddings=True),
}
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                   rope_theta=10000.0, tie_word_embeddings=False)
BLOCK_SIZE = 16
GREEDY = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)


class Bench:
    def __init__(self, smoke: bool, out: pathlib.Path):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.out = out
        self.results: dict[str, object] = {}

    def shapes(self) -> dict[str, dict]:
        return {"tiny": SMOKE_SHAPE} if self.smoke else SHAPES

    def kernels(self):
        return TORCH_KERNELS if self.smoke else triton_kernels()

    def capture(self):
        return EagerCapture() if self.smoke else cuda_capture(self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))


def llama_config(shape: dict, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, max_position_embeddings=max_len, rms_norm_eps=1e-5,
                       architectures=["LlamaForCausalLM"])


def random_model(bench: Bench, shape: dict, dtype: torch.dtype, max_len: int, seed: int = 0,
                 quantization: str | None = None) -> torch.nn.Module:
    """Our LLaMA with random weights made on the device (norms 1, the rest N(0, 0.02)), its
    linears quantized as --quantization does it when asked."""
    torch.manual_seed(seed)
    with torch.device(bench.device):
        model = LlamaForCausalLM(llama_config(shape, max_len), dtype, SINGLE)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0) if param.dim() == 1 else param.normal_(0.0, 0.02)
    model.quantization = None
    if quantization:
        quantize_linears(model, quantization)
    bind_kernels(model, bench.kernels())
    return model.eval()


class Driver:
    """Plays the scheduler for a ModelRunner: each request holds blocks for its whole life,
    taken from a simple free list."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.free = list(range(runner.limits.num_blocks))
        self.blocks: dict[str, list[int]] = {}
        self.step_id = 0

    def step(self, new=(), work=(), dropped=()) -> executor_pb2.StepResult:
        self.step_id += 1
        for rid in dropped:
            self.free += self.blocks.pop(rid)
        result = self.runner.execute(executor_pb2.StepPlan(
            step_id=self.step_id, new_requests=list(new), work=list(work),
            dropped_request_ids=list(dropped)))
        if result.error or result.failed_requests:
            raise RuntimeError(f"step {self.step_id}: {result.error or result.failed_requests}")
        return result

    def new(self, rid: str, tokens: list[int], computed: int, room: int,
            sampling=GREEDY) -> executor_pb2.NewRequest:
        count = math.ceil((len(tokens) + room) / BLOCK_SIZE)
        self.blocks[rid], self.free = self.free[:count], self.free[count:]
        return executor_pb2.NewRequest(request_id=rid, token_ids=tokens,
                                       num_prompt_tokens=len(tokens), sampling=sampling,
                                       block_ids=self.blocks[rid],
                                       num_computed_tokens=computed)


def make_runner(bench: Bench, model, num_blocks: int, max_len: int, max_seqs: int,
                graphs: DecodeGraphs | None) -> ModelRunner:
    allocate_kv_cache(model, num_blocks, BLOCK_SIZE, next(model.parameters()).dtype,
                      bench.device)
    limits = RunnerLimits(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=max_seqs,
                          max_num_batched_tokens=max(2048, max_seqs), max_model_len=max_len,
                          max_logprobs=5)
    return ModelRunner(model, limits, eos_token_ids=[], device=bench.device, graphs=graphs)


# -- sections ---------------------------------------------------------------------------------

def info(bench: Bench) -> dict:
    result = dict(torch=torch.__version__, cuda=torch.version.cuda,
                  triton=_version("triton"), vllm=_version("vllm"), sglang=_version("sglang"),
                  transformers=_version("transformers"))
    if bench.device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(bench.device)
        result["nvidia_smi"] = _run_text(["nvidia-smi"])
        result["driver"] = _run_text(["nvidia-smi", "--query-gpu=driver_version",
                                      "--format=csv,noheader"]).strip()
    return result


def copy_bandwidth(bench: Bench) -> float:
    """Bytes read + written per second by a device-to-device copy (median of 10)."""
    nbytes = (1 << 20) if bench.smoke else (2 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=bench.device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        bench.sync()
        start = time.perf_counter()
        dst.copy_(src)
        bench.sync()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[2:])


def steps(bench: Bench) -> dict:
    copy_bw = copy_bandwidth(bench)
    result: dict[str, object] = {"copy_bandwidth_gbps": copy_bw / 1e9, "models": {}}
    batches, context, timed = _step_sizes(bench)
    for name, shape in bench.shapes().items():
        result["models"][name] = _model_steps(bench, shape, batches, context, timed, copy_bw)
        bench.results["steps"] = result
        bench.save()
    return result


def quantized(bench: Bench) -> dict:
    """Issue 19's GPU figure: the 8B shape's decode steps with fp8 weights (int8 in the CPU
    smoke run: no fp8 there), beside the bf16 rows of `steps` from the same run."""
    method = "int8" if bench.smoke else "fp8"
    if not bench.smoke and not fp8_supported(bench.device):
        return {"skipped": f"{torch.cuda.get_device_name(bench.device)} has no fp8 tensor cores"}
    name, shape = next(iter(bench.shapes().items()))
    batches, context, timed = _step_sizes(bench)
    return {"method": method, "model": name,
            **_model_steps(bench, shape, batches, context, timed, copy_bandwidth(bench),
                           quantization=method)}


def _step_sizes(bench: Bench) -> tuple[list[int], int, int]:
    """Batch sizes, context and steps timed per round."""
    return ([1, 3], 40, 3) if bench.smoke else ([1, 16, 64, 256], 1024, 20)


def _model_steps(bench: Bench, shape: dict, batches: list[int], context: int, timed: int,
                 copy_bw: float, quantization: str | None = None) -> dict:
    dtype = torch.float32 if bench.smoke else torch.bfloat16
    rounds = 2
    max_len = context + 2 * rounds * (timed + 2) + BLOCK_SIZE
    model = random_model(bench, shape, dtype, max_len, quantization=quantization)
    per_seq = math.ceil(max_len / BLOCK_SIZE)
    runner = make_runner(bench, model, max(batches) * per_seq + 1, max_len, max(batches), None)
    started = time.perf_counter()
    graphs = DecodeGraphs(model, capture_sizes(max(batches)), max_len, BLOCK_SIZE,
                          bench.device, bench.capture())
    capture_s = time.perf_counter() - started
    # K and V of one token in every layer: [blocks, block_size, kv_heads, head_dim] caches.
    kv_per_token = sum(2 * key[0, 0].numel() * key.element_size() for key, _ in _caches(model))
    rows = []
    for batch in batches:
        times = {"graphs": [], "eager": []}
        for _ in range(rounds):
            for mode in times:
                runner.graphs = graphs if mode == "graphs" else None
                times[mode] += _decode_times(bench, runner, batch, context, timed)
        nbytes = weight_bytes(model) + batch * context * kv_per_token
        bound_ms = nbytes / copy_bw * 1e3
        row = dict(batch=batch, context=context, bound_ms=bound_ms, bytes_read=nbytes)
        for mode, samples in times.items():
            ms = statistics.median(samples)
            runner.graphs = graphs if mode == "graphs" else None
            busy_ms = _kernel_ms_per_step(bench, runner, batch, context)
            row[mode] = dict(step_ms=ms, share_of_bound=bound_ms / ms,
                             tok_s=batch / ms * 1e3,
                             gpu_idle_share=None if busy_ms is None else 1 - busy_ms / ms)
        rows.append(row)
        print(f"  batch {batch:4d}: graphs {row['graphs']['step_ms']:8.3f} ms, eager "
              f"{row['eager']['step_ms']:8.3f} ms, bound {bound_ms:8.3f} ms", flush=True)
    return dict(shape=shape, weight_bytes=weight_bytes(model), capture_seconds=capture_s,
                capture_sizes=len(graphs.sizes), rows=rows)


def _caches(model):
    return [m.kv_cache for m in model.modules() if getattr(m, "kv_cache", None) is not None]


def _decode_times(bench: Bench, runner: ModelRunner, batch: int, context: int,
                  timed: int) -> list[float]:
    """Milliseconds of each of `timed` decode steps of `batch` requests at about `context`
    tokens (their K/V taken as cached: the cache's contents do not change a step's time)."""
    runner.reset()
    driver = Driver(runner)
    vocab = runner.model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    rids = [f"r{i}" for i in range(batch)]
    new = [driver.new(rid, torch.randint(vocab, (context,), generator=gen).tolist(),
                      context - 1, timed + 2) for rid in rids]
    driver.step(new=new, work=[executor_pb2.ScheduledWork(request_id=r, num_tokens=1)
                               for r in rids])
    work = [executor_pb2.ScheduledWork(request_id=r, num_tokens=1) for r in rids]
    driver.step(work=work)  # warm
    times = []
    for _ in range(timed):
        bench.sync()
        start = time.perf_counter()
        driver.step(work=work)  # ends with the tokens' read: the step is done
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _kernel_ms_per_step(bench: Bench, runner: ModelRunner, batch: int,
                        context: int) -> float | None:
    """Milliseconds of GPU kernels and copies in one step, from torch.profiler (None on the
    CPU)."""
    if bench.device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _decode_times(bench, runner, batch, context, steps)
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events()
                  if e.device_type == DeviceType.CUDA)
    return busy_us / 1e3 / (steps + 2)  # the first step and the warm one are profiled too


def greedy(bench: Bench) -> dict:
    shape = SMOKE_SHAPE if bench.smoke else SHAPES["smollm2-135m"]
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(bench, shape, dtype, 512, seed=7)
        runner = make_runner(bench, model, 400, 512, 16, None)
        capture = bench.capture()
        graphs = DecodeGraphs(model, capture_sizes(16), 512, BLOCK_SIZE, bench.device, capture)
        tokens = {}
        for mode in ("eager", "graphs"):
            runner.graphs = graphs if mode == "graphs" else None
            tokens[mode] = _generate(runner, shape["vocab_size"])
        pairs = [(a, b) for rid in tokens["eager"]
                 for a, b in zip(tokens["eager"][rid], tokens["graphs"][rid], strict=True)]
        name = str(dtype).removeprefix("torch.")
        result[name] = dict(equal=tokens["eager"] == tokens["graphs"],
                            agreement=sum(a == b for a, b in pairs) / len(pairs),
                            tokens=sum(map(len, tokens["eager"].values())),
                            replays=getattr(capture, "replays", None))
        print(f"  greedy {name}: graphs == eager: {result[name]['equal']}", flush=True)
    result["passed"] = bool(result["float32"]["equal"])
    return result


def _generate(runner: ModelRunner, vocab: int) -> dict[str, list[int]]:
    """11 prompts of 5-45 tokens, request i generating 4 + 3 i tokens: decode batches of 11
    down to 1 sequences (padded to 16, 8, 4, 2)."""
    runner.reset()
    driver = Driver(runner)
    gen = torch.Generator().manual_seed(3)
    wanted = {f"r{i}": 4 + 3 * i for i in range(11)}
    prompts = {rid: torch.randint(vocab, (5 + 4 * i,), generator=gen).tolist()
               for i, rid in enumerate(wanted)}
    out: dict[str, list[int]] = {rid: [] for rid in wanted}
    result = driver.step(new=[driver.new(rid, p, 0, wanted[rid]) for rid, p in prompts.items()],
                         work=[executor_pb2.ScheduledWork(request_id=rid, num_tokens=len(p))
                               for rid, p in prompts.items()])
    while True:
        for output in result.outputs:
            out[output.request_id] += output.token_ids
        done = [rid for rid in out if len(out[rid]) >= wanted[rid] and rid in driver.blocks]
        active = [rid for rid in out if len(out[rid]) < wanted[rid]]
        if not active:
            return out
        result = driver.step(work=[executor_pb2.ScheduledWork(request_id=rid, num_tokens=1)
                                   for rid in active], dropped=done)


def syncs(bench: Bench) -> dict:
    """Synchronising calls inside one decode step with graphs (torch's sync debug mode)."""
    if bench.device.type != "cuda":
        return {"skipped": "torch.cuda.set_sync_debug_mode needs CUDA"}
    shape = SHAPES["smollm2-135m"]
    model = random_model(bench, shape, torch.bfloat16, 512)
    runner = make_runner(bench, model, 400, 512, 16, None)
    runner.graphs = DecodeGraphs(model, capture_sizes(16), 512, BLOCK_SIZE, bench.device,
                                 bench.capture())
    sampled = common_pb2.SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0.5,
                                        seed=1, ignore_eos=True)
    result = {}
    for name, params in (("greedy", GREEDY), ("sampled", sampled)):
        runner.reset()
        driver = Driver(runner)
        rids = [f"r{i}" for i in range(5)]
        driver.step(new=[driver.new(r, list(range(10, 30)), 0, 8, params) for r in rids],
                    work=[executor_pb2.ScheduledWork(request_id=r, num_tokens=20)
                          for r in rids])
        work = [executor_pb2.ScheduledWork(request_id=r, num_tokens=1) for r in rids]
        driver.step(work=work)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                driver.step(work=work)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        messages = [str(w.message).splitlines()[0] for w in caught]
        result[name] = dict(count=len(messages), messages=messages)
        print(f"  syncs in a {name} decode step: {len(messages)}", flush=True)
    return result


def e2e(bench: Bench) -> dict:
    """`pagedserve bench throughput` (graphs, then --enforce-eager) and `bench serve` over
    HTTP, on random checkpoints of each shape."""
    num_prompts, input_len, output_len = (4, 16, 8) if bench.smoke else (256, 1024, 256)
    workload = ["--dataset", "random", "--num-prompts", str(num_prompts), "--input-len",
                str(input_len), "--output-len", str(output_len), "--ignore-eos"]
    engine = ["--max-model-len", str(2 * input_len + output_len)]
    if bench.smoke:
        engine += ["--device", "cpu", "--dtype", "float32", "--kv-cache-gib", "0.05"]
    result = {}
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu-serving-"))
    try:
        for name, shape in bench.shapes().items():
            directory = save_random_checkpoint(bench, shape, work / name)
            runs = result[name] = {}
            for mode, flags in (("graphs", []), ("eager", ["--enforce-eager"])):
                runs[f"throughput {mode}"] = _bench_json(
                    ["bench", "throughput", "--model", str(directory), *workload, *engine,
                     *flags], work / f"{name}-{mode}.json", timeout=900)
                print(f"  {name} throughput {mode}: "
                      f"{runs[f'throughput {mode}'].get('output_throughput')}", flush=True)
            bench.results["e2e"] = result
            bench.save()
            if name != "llama3-8b":
                runs["serve graphs"] = _serve(
                    directory, [*workload, "--random-vocab-size", str(shape["vocab_size"])],
                    engine, work / name)
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def save_random_checkpoint(bench: Bench, shape: dict, directory: pathlib.Path) -> pathlib.Path:
    """A Hugging Face LLaMA of `shape` with random bf16 weights (made on the device: 8B
    parameters would take minutes on the host) and the tests' byte-level tokenizer."""
    from transformers import LlamaForCausalLM as HfLlama

    from pagedserve.testing.tiny_models import byte_level_tokenizer

    dtype = torch.float32 if bench.smoke else torch.bfloat16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(bench.device):
            model = HfLlama(llama_config(shape, 4096))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    del model
    return directory


def _bench_json(args: list[str], result_json: pathlib.Path, timeout: int) -> dict:
    """Runs `python -m pagedserve <args>`; its --result-json, or its error."""
    command = [sys.executable, "-m", "pagedserve", *args, "--result-json", str(result_json)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode:
        return {"error": f"exit {done.returncode}", "stderr": done.stderr[-3000:]}
    return json.loads(result_json.read_text())


def _serve(directory: pathlib.Path, workload: list[str], engine: list[str],
           work: pathlib.Path) -> dict:
    """`pagedserve up` on loopback and `pagedserve bench serve` against it."""
    port = 18000
    log = (work.parent / f"{work.name}-up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "pagedserve", "up", "--model", str(directory),
                           "--http-port", str(port), *engine], stdout=log, stderr=log)
    try:
        if not _wait_ready(f"http://127.0.0.1:{port}/ready", up, 600):
            return {"error": "pagedserve up did not get ready",
                    "log": (work.parent / f"{work.name}-up.log").read_text()[-3000:]}
        return _bench_json(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                            *workload, "--max-concurrency", "256", "--disable-tqdm"],
                           work.parent / f"{work.name}-serve.json", timeout=900)
    finally:
        up.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.wait(30)
        up.kill()


def _wait_ready(url: str, process: subprocess.Popen, timeout: float) -> bool:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        time.sleep(1)
    return False


def peer(bench: Bench) -> dict:
    """vLLM's `bench throughput` on the same workload and the small shape, when installed."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed on this machine"}
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu-peer-"))
    try:
        directory = save_random_checkpoint(bench, SHAPES["smollm2-135m"], work / "small")
        out = work / "vllm.json"
        done = subprocess.run(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "throughput",
             "--model", str(directory), "--dataset-name", "random", "--num-prompts", "256",
             "--random-input-len", "1024", "--random-output-len", "256",
             "--max-model-len", "2304", "--output-json", str(out)],
            capture_output=True, text=True, timeout=900, check=False)
        if done.returncode:
            return {"error": f"exit {done.returncode}", "stderr": done.stderr[-3000:]}
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _run_text(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30,
                              check=False).stdout
    except OSError as exc:
        return f"{command[0]}: {exc}"


SECTIONS = {"info": info, "steps": steps, "greedy": greedy, "syncs": syncs,
            "quantized": quantized, "e2e": e2e, "peer": peer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True,
                        help="folder for results.json")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    bench = Bench(args.smoke, args.out)
    failed = False
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            bench.results[name] = SECTIONS[name](bench)
        except Exception as exc:  # recorded: the next section still runs
            traceback.print_exc()
            bench.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
        print(f"   {name}: {time.perf_counter() - started:.0f} s", flush=True)
        bench.save()
        gc.collect()  # the section's models and caches, before the next one profiles memory
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    greedy_result = bench.results.get("greedy", {})
    return 1 if failed or greedy_result.get("passed") is False else 0


if __name__ == "__main__":
    sys.exit(main())
