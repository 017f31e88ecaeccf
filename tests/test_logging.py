"""Every log line, structlog's or a library's, carries the service; request lines carry the id."""

import json
import subprocess
import sys

SCRIPT = """
import logging, structlog
from pagedserve.runtime.log import configure_logging
configure_logging("scheduler", "info", "{fmt}")
structlog.get_logger("x").info("hello", n=1)
structlog.contextvars.bind_contextvars(request_id="req-7")
structlog.get_logger("x").warning("about a request")
logging.getLogger("grpc").info("from the standard library")
logging.getLogger("grpc").debug("below the level")
"""


def run(fmt: str) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(fmt=fmt)], capture_output=True,
                          text=True, check=True).stderr


def test_json_lines_carry_service_and_request_id():
    lines = [json.loads(line) for line in run("json").splitlines()]
    assert [line["event"] for line in lines] == [
        "hello", "about a request", "from the standard library"]
    assert all(line["service"] == "scheduler" and "timestamp" in line for line in lines)
    assert "request_id" not in lines[0]
    assert lines[1]["request_id"] == "req-7" and lines[1]["level"] == "warning"
    assert lines[2]["logger"] == "grpc"


def test_console_format_is_readable_text():
    out = run("console")
    assert "hello" in out and "service=scheduler" in out and "request_id=req-7" in out
    assert not out.lstrip().startswith("{")
