"""Prompts for greedy-agreement checks on the default model (a mode against a reference, token
by token): facts, instructions, stories and code. tests/test_bf16_parity.py states its tolerance
on these 16; benchmarks/bench_quantization_quality.py adds more of the same kinds."""

GREEDY_PROMPTS = [
    "The capital of France is", "Water boils at a temperature of",
    "The largest planet in our solar system is", "To make a cup of tea, first",
    "In 1969, the first person to walk on the moon was", "The chemical symbol for gold is",
    "A haiku about autumn:", "def fibonacci(n):", "The three primary colors are",
    "Photosynthesis is the process by which", "The quick brown fox",
    "Once upon a time, in a small village,", "The speed of light is approximately",
    "My favourite recipe for pancakes needs", "The tallest mountain on Earth is",
    "import numpy as np\n",
]
