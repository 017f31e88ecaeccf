"""The soak test's CI size (issues 9 and 17): benchmarks/soak.py against `pagedserve up` with a
tiny model.

- 50 streaming clients for a warm-up and two rounds, 10% of them hanging up mid-stream. The
  script checks zero 5xx, well-formed streams, no leaked KV blocks, file descriptors or tasks,
  and flat RSS, and exits 1 naming any miss; this test also checks its report is complete.
- --chaos under `up --executors 2`: 40 clients (greedy and seeded) replayed in two rounds; in the
  second, executor 0 and then the scheduler get SIGKILL mid-load. Every request completes, with
  the tokens of the undisturbed round, and no KV block stays held."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "soak.py"
CLIENTS, ROUNDS = 50, 2
CHAOS_CLIENTS = 40

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


def test_chaos_soak_loses_no_request_and_no_token():
    """Issue 17's soak: SIGKILL of an executor, then of the scheduler, mid-load under
    `up --executors 2`; 0 failed requests, tokens identical to the undisturbed round (greedy
    and seeded), 0 leaked blocks, both children restarted and `up` still running."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--chaos", "--clients",
                             str(CHAOS_CLIENTS), "--rounds", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    out = result.stdout
    print(out)
    assert result.returncode == 0 and out.rstrip().endswith("PASSED"), out + result.stderr
    kills = re.findall(r"chaos kill: (executor 0|scheduler) \(pid \d+\) SIGKILL .*?, (\d+) "
                       r"(?:sequences running on it|requests running or waiting); longest "
                       r"pause a client saw across it ([\d.]+) s \((\d+) streams spanning it\); "
                       r"back \(registered\) after", out)
    assert [k[0] for k in kills] == ["executor 0", "scheduler"], out
    for _, in_flight, pause, spanning in kills:
        assert int(in_flight) > 0 and int(spanning) > 0, out  # each kill landed mid-load
        assert float(pause) < 60, out
    assert "restarted (new pid; fds, tasks and RSS not compared): scheduler, executor 0;" in out
    line = next(line for line in out.splitlines() if line.startswith("chaos round 2 (chaos)"))
    dropped = round(CHAOS_CLIENTS * 0.1)
    assert (f"sent {CHAOS_CLIENTS}, completed {CHAOS_CLIENTS - dropped}, dropped by their "
            f"clients {dropped}, failed 0;") in line, line
    figures = re.search(r"greedy (\d+)/(\d+), seeded (\d+)/(\d+), hung-up prefixes "
                        r"(\d+)/(\d+); blocks leaked (\d+)$", line)
    assert figures, line
    greedy, greedy_all, seeded, seeded_all, prefixes, prefixes_all, leaked = map(
        int, figures.groups())
    assert greedy == greedy_all > 0 and seeded == seeded_all > 0, line
    assert prefixes == prefixes_all == dropped and leaked == 0, line
    assert "transport errors 0; malformed streams 0" in out
