"""The soak test's CI size (issue 9): benchmarks/soak.py with 50 streaming clients for a warm-up
and two rounds, 10% of them hanging up mid-stream, against `pagedserve up` with a tiny model.
The script checks zero 5xx, well-formed streams, no leaked KV blocks, file descriptors or tasks,
and flat RSS, and exits 1 naming any miss; this test also checks its report is complete."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "soak.py"
CLIENTS, ROUNDS = 50, 2

pytestmark = pytest.mark.slow


def test_short_soak_passes_every_check():
    result = subprocess.run([sys.executable, str(SCRIPT), "--clients", str(CLIENTS),
                             "--rounds", str(ROUNDS)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    out = result.stdout
    assert result.returncode == 0 and out.rstrip().endswith("PASSED"), out + result.stderr
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == ROUNDS
    dropped = round(CLIENTS * 0.1)
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert int(cells[1]) == CLIENTS - dropped and int(cells[2]) == dropped, row
        assert float(cells[3]) > 0 and 0 < float(cells[4]) <= float(cells[5]), row
        assert cells[6] == f"{{200: {CLIENTS}}}", row
        assert all(name in cells[7] for name in ("gateway", "scheduler", "executor")), row
    assert "transport errors 0; malformed streams 0" in out
