"""benchmarks/bench_quantization_quality.py on a few hundred tokens of its text and four short
prompts: every mode's perplexity is a perplexity (finite, above 1, near bf16's: a quantized
model that computed garbage would be far off), each reference agrees fully with itself, and the
agreement figures are shares and counts within their ranges."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

SCRIPT = (pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
          / "bench_quantization_quality.py")
PROMPTS, MAX_TOKENS, TEXT_TOKENS, WINDOW = 4, 8, 300, 128


@pytest.mark.slow
def test_the_quality_figures_are_sane(tmp_path):
    out = tmp_path / "quality.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--prompts", str(PROMPTS),
                           "--max-tokens", str(MAX_TOKENS), "--text-tokens", str(TEXT_TOKENS),
                           "--window", str(WINDOW), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vs bf16:" in done.stdout and "vs float32:" in done.stdout
    results = json.loads(out.read_text())
    windows = math.ceil(TEXT_TOKENS / WINDOW)
    assert results["text"] == {"path": "benchmarks/workloads/quality_text.txt",
                               "tokens": TEXT_TOKENS, "window": WINDOW, "windows": windows,
                               "scored_tokens": TEXT_TOKENS - windows}
    modes = results["modes"]
    assert set(modes) == {"float32", "bf16", "int8", "w8a8_int8", "gguf"}
    for mode, figures in modes.items():
        assert math.isfinite(figures["perplexity"]) and figures["perplexity"] > 1, mode
        assert figures["perplexity"] < 1.25 * modes["bf16"]["perplexity"], mode
        for ref, vs in figures["vs"].items():
            assert 0 <= vs["first_token_agreement"] <= 1, (mode, ref)
            assert 0 <= vs["text_top1_agreement"] <= 1, (mode, ref)
            assert 0 <= vs["first_token_matches"] <= PROMPTS, (mode, ref)
            assert 0 <= vs["mean_common_prefix"] <= MAX_TOKENS, (mode, ref)
            assert len(vs["common_prefixes"]) == PROMPTS
    for ref in ("bf16", "float32"):
        itself = modes[ref]["vs"][ref]
        assert itself["perplexity_change"] == 0
        assert itself["first_token_agreement"] == itself["text_top1_agreement"] == 1
        assert itself["mean_common_prefix"] == MAX_TOKENS
        assert itself["full_matches"] == PROMPTS
