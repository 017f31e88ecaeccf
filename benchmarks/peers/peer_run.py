"""What every peer runner shares (bench_hf.py, bench_vllm_offline.py, bench_openai_client.py):
where the model and the workload are, the flags naming them, reading the workload and
appending a result line. Standard library only: each runner runs in its own engine's venv."""

import argparse
import json
import os
import pathlib
import tempfile

DEFAULT_MODEL_DIR = os.path.join(tempfile.gettempdir(), "models", "smollm2-135m")
DEFAULT_WORKLOAD = pathlib.Path(__file__).resolve().parents[1] / "workloads" / "reference.jsonl"


def add_common_args(ap: argparse.ArgumentParser, *, model_dir: bool = True) -> None:
    """--model-dir (the converted model, $MODEL_DIR), --workload ($WORKLOAD), --limit, --out."""
    if model_dir:
        ap.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR))
    ap.add_argument("--workload", default=os.environ.get("WORKLOAD", str(DEFAULT_WORKLOAD)))
    ap.add_argument("--limit", type=int, default=0, help="only the first N requests (smoke test)")
    ap.add_argument("--out", default="", help="append the result as one JSON line to this file")


def load_workload(path: str, limit: int = 0) -> list[dict]:
    """The workload's requests, one JSON object per line; the first `limit` when set."""
    with open(path) as f:
        reqs = [json.loads(line) for line in f if line.strip()]
    return reqs[:limit] if limit else reqs


def append_result(path: str, record: dict) -> None:
    """One JSON line per run, appended (summarize.py tables every line of a results file)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
