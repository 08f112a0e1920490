"""The ``tether`` CLI end to end with real processes: ``tether dev``, ``tether worker`` and
``tether workflow ...`` commands, in text and JSON output."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tether.cli import cli

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
    """``tether workflow ...`` on a store (``db_url``) or through a server (``address``)."""

    def __init__(self, db_url: str | None = None, address: str | None = None) -> None:
        self.where = ["--db", db_url] if db_url else ["--address", str(address)]

    def argv(self, *args: str) -> list[str]:
        return [*TETHER, "workflow", args[0], *self.where, *args[1:]]

    def __call__(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, env=ENV, timeout=60)
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
        [*TETHER, "dev", "--db", str(db_file), "--port", str(port), "--max-payload-bytes", "4096"],
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
    answer = cli.json("result", "cli-1")
    assert answer == {
        "status": "completed",
        "workflow_id": "cli-1",
        "run_id": answer["run_id"],
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

    # replay-check, also under 'workflow', with --db for --store.
    replayed = subprocess.run(
        [*TETHER, "workflow", "replay-check", "--module", "server_app", *cli.where],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr

    # SIGTERM: the worker shuts down gracefully and exits 0.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert "worker stopped" in (tmp_path / "worker.log").read_text()


def test_help_has_an_example_on_every_command() -> None:
    commands = [["server"], ["dev"], ["worker"], ["db", "migrate"]] + [
        ["workflow", c]
        for c in (
            "start",
            "execute",
            "describe",
            "result",
            "signal",
            "query",
            "update",
            "stack",
            "cancel",
            "terminate",
            "list",
            "count",
            "show",
            "replay-check",
        )
    ]
    runner = CliRunner(env={"TETHER_DB": None, "TETHER_ADDRESS": None, "COLUMNS": "120"})
    for command in [[], ["workflow"], *commands]:
        result = runner.invoke(cli, [*command, "--help"])
        if command[-1:] == ["replay-check"]:  # argparse prints its help and exits itself
            assert result.exit_code == 0, command
            continue
        assert result.exit_code == 0, (command, result.output)
        assert "Example" in result.output, command
        if command in ([], ["workflow"]):
            assert "Exit codes" in result.output and "2  bad usage" in result.output
    for args, words in [
        (["workflow", "start"], "Missing argument"),
        (["worker", "nope:", "--db", "sqlite:///x.db"], "module:attr"),
        (["worker", "server_app", "--db", "sqlite:///x.db", "--until-idle", "0"], "until-idle"),
        (["worker", "m", "--db", "sqlite:///x.db", "--max-concurrent-activities", "0"], "0"),
        (["workflow", "list", "--db", "sqlite:///x.db", "--address", "http://x"], "not both"),
        (["workflow", "list"], "--db URL"),
        (["workflow", "count", "--db", "sqlite:///x.db", "-n", "bad ns"], "namespace"),
        (["workflow", "list", "--address", "ftp://x"], "http://"),
    ]:
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and words in result.output, (args, result.output)
    # In a real process: --db or --address may come from the environment, and the
    # command line wins over it.
    unreachable = {**ENV, "TETHER_ADDRESS": "http://127.0.0.1:9"}
    with ThreadPoolExecutor(2) as pool:
        from_env = pool.submit(
            subprocess.run,
            [*TETHER, "workflow", "count"],
            capture_output=True,
            text=True,
            env=unreachable,
        )
        overridden = pool.submit(
            subprocess.run,
            [*TETHER, "workflow", "count", "--db", f"sqlite:///{os.devnull}.db"],
            capture_output=True,
            text=True,
            env=unreachable,
        )
        assert from_env.result().returncode == 1
        assert "cannot reach the Tether server" in from_env.result().stderr
        assert "cannot reach" not in overridden.result().stderr


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[0-9.:+]*")


def _session(cli: Cli, p: str) -> list[tuple[int, str, str]]:
    """The same commands in one mode, on ids under ``p/``; their outputs, normalized."""
    seen: list[tuple[int, str, str]] = []

    def run(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = cli(*args, code=code)
        norm = [
            _TIME.sub("<time>", _UUID.sub("<uuid>", o.replace(p, "P")))
            for o in (proc.stdout, proc.stderr)
        ]
        seen.append((proc.returncode, norm[0], norm[1]))
        return proc

    assert run("execute", "Quick", "2", "3", "-q", "api-test", "--id", f"{p}/sum").stdout == "5\n"
    run("execute", "Quick", "2", "3", "-q", "api-test", "--id", f"{p}/sum2", "-o", "json")
    # Signal-with-start, a search attribute, and an id with a '/' in it.
    run(
        "start",
        *("Greeter", '"Ada"', "-q", "api-test", "--id", f"{p}/greet", "--signal", "set_greeting"),
        *("--signal-arg", '"Yo"', "--search-attribute", "team=blue", "-o", "json"),
    )
    assert json.loads(run("query", f"{p}/greet", "current", "-o", "json").stdout) == {
        "result": "Yo, Ada!"
    }
    assert "server_app.py" in run("stack", f"{p}/greet").stdout
    listed = run("list", "--id-prefix", f"{p}/", "--search-attribute", "team=blue").stdout
    assert f"{p}/greet" in listed and "1 workflow(s)" in listed
    run("list", "--id-prefix", f"{p}/", "--status", "completed", "-o", "jsonl")
    assert run("count", "--id-prefix", f"{p}/", "--status", "completed").stdout == "2\n"
    run("describe", f"{p}/nope", code=1)
    run("list", "--started-after", "yesterday", code=2)
    run("count", "--search-attribute", "bad key=1", code=2)
    run("query", f"{p}/greet", "no_such_query", code=2)
    # show --follow streams the history until the run closes.
    follower = subprocess.Popen(
        cli.argv("show", f"{p}/greet", "--follow", "-o", "jsonl"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert follower.stdout is not None
    first = json.loads(follower.stdout.readline())
    assert first["type"] == "WorkflowStarted" and first["data"]["workflow_id"] == f"{p}/greet"
    run("signal", f"{p}/greet", "finish")
    # Through the same buffered reader as the first line (communicate() would skip
    # what readline() buffered already); EOF comes when the follower exits.
    rest = follower.stdout.read()
    assert follower.wait(20) == 0, follower.communicate()[1]
    events = [first] + [json.loads(line) for line in rest.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert "WorkflowCompleted" in [e["type"] for e in events[-2:]]
    return seen


def test_both_modes_answer_alike(dev_env: tuple[Cli, str, subprocess.Popen[str]]) -> None:
    """The same commands with --db and with --address: same output, messages, exit codes."""
    cli, base, _ = dev_env
    with ThreadPoolExecutor(2) as pool:
        direct = pool.submit(_session, cli, "mode-d")
        through_server = pool.submit(_session, Cli(address=base), "mode-h")
        assert direct.result() == through_server.result()
    # The server's limits: --max-payload-bytes 4096 (each argument), a clear 413.
    api = Cli(address=base)
    big = api("start", "Quick", json.dumps("x" * 5000), "-q", "api-test", code=2)
    assert "over the limit" in big.stderr
    r = httpx.post(
        f"{base}/api/v1/namespaces/default/workflows",
        json={"workflow_type": "Quick", "task_queue": "api-test", "args": ["x" * 5000, 1]},
    )
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    assert "4096" in r.json()["message"]


def test_worker_sigterm_hands_back_work_and_until_idle_exits(tmp_path: Path) -> None:
    """SIGTERM during activities: one finishes within the grace period, the other is handed
    back; a new worker reruns it and exits by itself once its queue is idle."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    cli = Cli(url)
    log = tmp_path / "worker.log"

    def worker(*extra: str) -> subprocess.Popen[str]:
        with open(log, "a") as err:
            return subprocess.Popen(
                [*TETHER, "worker", *extra, "--db", url, "--task-queue", "jobs"],
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
                env=ENV,
            )

    first = worker(
        "server_app:make_worker",
        "--graceful-shutdown-timeout",
        "1.2",
        "--max-concurrent-activities",
        "4",
        "--max-concurrent-workflow-tasks",
        "2",
    )
    try:
        slow, quick = tmp_path / "slow", tmp_path / "quick"
        cli("start", "Job", json.dumps(str(slow)), "60", "-q", "jobs", "--id", "job-slow")
        cli("start", "Job", json.dumps(str(quick)), "0.6", "-q", "jobs", "--id", "job-quick")
        try:
            wait_for(lambda: Path(f"{slow}.1").exists() and Path(f"{quick}.1").exists(), "both")
        except AssertionError as e:
            shown = cli("list", "-o", "json").stdout
            raise AssertionError(f"{e}\nworker log:\n{log.read_text()}\nruns: {shown}") from e
        assert "polling task queue 'jobs'" in log.read_text()
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert "finishing in-flight work" in log.read_text()
    # The quick activity finished during the grace period; the slow one was handed back.
    assert "ActivityCompleted" in [e["type"] for e in cli.json("show", "job-quick")]
    assert "ActivityCompleted" not in [e["type"] for e in cli.json("show", "job-slow")]
    assert cli.json("describe", "job-slow")["status"] == "running"

    second = worker("server_app", "--until-idle", "0.5")
    try:
        assert second.wait(30) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert "no work for 0.5 s" in log.read_text()
    # Nothing lost: the handed-back attempt ran again; the finished one did not.
    assert cli.json("result", "job-slow")["result"] == 2
    assert cli.json("result", "job-quick")["result"] == 1
    assert not Path(f"{quick}.2").exists()
