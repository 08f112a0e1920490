"""The ``tether`` CLI end to end with real processes: ``tether dev``, ``tether worker`` and
``tether workflow ...`` commands, in text and JSON output."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

TESTS = Path(__file__).parent
_bin = Path(sys.executable).parent / "tether"
TETHER = [str(_bin)] if _bin.exists() else [sys.executable, "-m", "tether.cli"]
ENV = {**os.environ, "PYTHONPATH": str(TESTS), "COLUMNS": "200", "TETHER_API_KEYS": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Cli:
    def __init__(self, db_url: str) -> None:
        self.db_url = db_url

    def __call__(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*TETHER, "workflow", args[0], "--db", self.db_url, *args[1:]],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self(*args, "-o", "json", code=code).stdout)


@pytest.fixture
def dev_env(tmp_path: Path) -> Iterator[tuple[Cli, str, subprocess.Popen[str]]]:
    worker_log = tmp_path / "worker.log"
    with open(tmp_path / "dev.log", "w") as dev_log, open(worker_log, "w") as worker_err:
        yield from _dev_env(tmp_path, dev_log, worker_err)


def _dev_env(
    tmp_path: Path, dev_log: Any, worker_err: Any
) -> Iterator[tuple[Cli, str, subprocess.Popen[str]]]:
    db_file = tmp_path / "sub" / "dev.db"  # the directory does not exist yet either
    port = free_port()
    dev = subprocess.Popen(
        [*TETHER, "dev", "--db", str(db_file), "--port", str(port)],
        stdout=dev_log,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert dev.poll() is None, (tmp_path / "dev.log").read_text()
        try:
            return httpx.get(base + "/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    worker_log = tmp_path / "worker.log"
    worker: subprocess.Popen[str] | None = None
    try:
        wait_for(healthy, "tether dev to listen")
        assert db_file.exists()
        out = (tmp_path / "dev.log").read_text()
        assert f"listening on {base}" in out and f"sqlite:///{db_file}" in out
        url = f"sqlite:///{db_file}"
        worker = subprocess.Popen(
            [*TETHER, "worker", "server_app:make_worker", "--db", url],
            stdout=subprocess.DEVNULL,
            stderr=worker_err,
            text=True,
            env=ENV,
        )
        wait_for(lambda: "polling task queue 'api-test'" in worker_log.read_text(), "worker")
        yield Cli(url), base, worker
    finally:
        for proc in (worker, dev):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_cli_end_to_end(dev_env: tuple[Cli, str, subprocess.Popen[str]], tmp_path: Path) -> None:
    cli, base, worker = dev_env
    out = cli("start", "Greeter", '"Ada"', "-q", "api-test", "--id", "cli-1").stdout
    assert out.startswith("started workflow cli-1 (run ")
    started = cli.json("start", "Quick", "2", "3", "-q", "api-test", "--id", "cli-sum")
    assert started["workflow_id"] == "cli-sum" and started["run_id"]
    # Already running: a failure (exit 1) with a clear message.
    dup = cli("start", "Greeter", '"Bob"', "-q", "api-test", "--id", "cli-1", code=1)
    assert "cli-1" in dup.stderr

    assert cli.json("describe", "cli-1")["status"] == "running"
    assert "Greeter" in cli("describe", "cli-1").stdout

    def first_task_done() -> bool:
        return any(e["type"] == "WorkflowTaskCompleted" for e in cli.json("show", "cli-1"))

    wait_for(first_task_done, "the first workflow task")
    assert cli.json("query", "cli-1", "current") == {"result": "Hello, Ada!"}
    assert cli("signal", "cli-1", "set_greeting", '"Hi"').stdout.strip() == (
        "signalled cli-1: set_greeting"
    )
    assert cli.json("update", "cli-1", "rename", '"Grace"', "--update-id", "u1") == {
        "result": "Ada"
    }
    assert cli("query", "cli-1", "current").stdout.strip() == '"Hi, Grace!"'
    cli("signal", "cli-1", "finish", "-o", "json")
    assert cli("result", "cli-1", "--timeout", "20").stdout.strip() == '"Hi, Grace!"'
    assert cli.json("result", "cli-1") == {
        "status": "completed",
        "workflow_id": "cli-1",
        "result": "Hi, Grace!",
    }
    assert cli("result", "cli-sum", "--timeout", "20").stdout.strip() == "5"

    listed = cli("list").stdout
    assert "cli-1" in listed and "cli-sum" in listed and "2 workflow(s)" in listed
    rows = cli.json("list", "--status", "completed", "--type", "Greeter")
    assert [r["workflow_id"] for r in rows] == ["cli-1"]
    shown = cli("show", "cli-1").stdout
    assert "WorkflowStarted" in shown and "SignalReceived" in shown
    assert cli.json("show", "cli-1")[0]["type"] == "WorkflowStarted"

    # The dev server serves the same store over HTTP.
    listed_http = httpx.get(base + "/api/v1/namespaces/default/workflows").json()["workflows"]
    assert {"cli-1", "cli-sum"} <= {w["workflow_id"] for w in listed_http}

    # Failures and cancellations exit 1; bad usage exits 2; unknown ids exit 1.
    cli("start", "-q", "api-test", "--id", "cli-fail", "--", "Quick", "-1", "2")
    failed = cli("result", "cli-fail", "--timeout", "20", code=1)
    assert "a must not be negative" in failed.stderr
    assert cli.json("result", "cli-fail", code=1)["status"] == "failed"
    cli("start", "Sleeper", "-q", "api-test", "--id", "cli-sleep")
    cli("start", "Sleeper", "-q", "api-test", "--id", "cli-term")
    assert "cancellation requested" in cli("cancel", "cli-sleep", "--reason", "bye").stdout
    assert cli.json("terminate", "cli-term") == {"ok": True}
    assert cli.json("result", "cli-sleep", "--timeout", "20", code=1)["status"] == "cancelled"
    assert cli.json("result", "cli-term", "--timeout", "20", code=1)["status"] == "terminated"
    assert "no workflow 'nope'" in cli("describe", "nope", code=1).stderr
    bad = cli("signal", "cli-sleep", "x", "{not json", code=2)
    assert "not valid JSON" in bad.stderr
    cli("start", "Greeter", '"Z"', "-q", "api-test", "--id", "cli-2")
    unknown = cli("signal", "cli-2", "no_such_signal", code=2)
    assert "no signal handler" in unknown.stderr
    cli("terminate", "cli-2")
    assert cli.json("list", "--namespace", "elsewhere") == []

    # SIGTERM: the worker shuts down gracefully and exits 0.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert "worker stopped" in (tmp_path / "worker.log").read_text()


def test_help_has_an_example_on_every_command() -> None:
    commands = [["server"], ["dev"], ["worker"]] + [
        ["workflow", c]
        for c in (
            "start",
            "describe",
            "result",
            "signal",
            "query",
            "update",
            "cancel",
            "terminate",
            "list",
            "show",
        )
    ]
    for command in commands:
        proc = subprocess.run(
            [*TETHER, *command, "--help"], capture_output=True, text=True, env=ENV, timeout=30
        )
        assert proc.returncode == 0, command
        assert "Example" in proc.stdout, command
    bad = subprocess.run([*TETHER, "workflow", "start"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2
    worker = subprocess.run(
        [*TETHER, "worker", "nope", "--db", "sqlite:///x.db"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert worker.returncode == 2 and "module:attr" in worker.stderr
