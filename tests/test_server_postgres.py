"""Two ``tether server`` processes on one PostgreSQL database serve the same workflows."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from api_harness import WorkerThread
from server_app import TASK_QUEUE, make_worker
from test_cli import ENV, TETHER, free_port, wait_for

WF = "/api/v1/namespaces/default/workflows"


@pytest.fixture
def two_servers(fresh_postgres: str) -> Iterator[list[str]]:
    procs: list[subprocess.Popen[bytes]] = []
    bases = []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        *TETHER,
                        "server",
                        "--db",
                        fresh_postgres,
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=ENV,
                )
            )
            bases.append(f"http://127.0.0.1:{port}")
        for proc, base in zip(procs, bases, strict=True):

            def ready(proc: subprocess.Popen[bytes] = proc, base: str = base) -> bool:
                assert proc.poll() is None, "tether server exited"
                try:
                    return httpx.get(base + "/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, f"server {base}")
        yield bases
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_two_servers_share_one_postgres(fresh_postgres: str, two_servers: list[str]) -> None:
    a, b = (httpx.Client(base_url=base, timeout=30) for base in two_servers)
    with WorkerThread(fresh_postgres, make_worker):
        r = a.post(
            WF,
            json={
                "workflow_type": "Greeter",
                "task_queue": TASK_QUEUE,
                "workflow_id": "pg-1",
                "args": ["Ada"],
                "search_attributes": {"team": "red", "size": 3},
            },
        )
        assert r.status_code == 201, r.text
        assert b.get(WF + "/pg-1").json()["status"] == "running"

        def first_task_done() -> bool:
            events = b.get(WF + "/pg-1/history").json()["events"]
            return any(e["type"] == "WorkflowTaskCompleted" for e in events)

        wait_for(first_task_done, "the first workflow task")
        # The id is taken for both servers.
        again = b.post(
            WF, json={"workflow_type": "Greeter", "task_queue": TASK_QUEUE, "workflow_id": "pg-1"}
        )
        assert again.status_code == 409
        assert b.post(WF + "/pg-1/updates/rename", json={"args": ["Grace"]}).json() == {
            "result": "Ada"
        }
        assert a.post(WF + "/pg-1/queries/current").json() == {"result": "Hello, Grace!"}
        # One server streams the history while the run finishes through the other.
        with b.stream("GET", WF + "/pg-1/history", params={"follow": "true"}) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines))["type"] == "WorkflowStarted"
            assert a.post(WF + "/pg-1/signals/finish").status_code == 202
            followed = [json.loads(line)["type"] for line in lines if line]
        assert "WorkflowCompleted" in followed
        done = a.get(WF + "/pg-1/result", params={"wait": 20}).json()
        assert done["status"] == "completed" and done["result"] == "Hello, Grace!"
        assert [w["workflow_id"] for w in b.get(WF).json()["workflows"]] == ["pg-1"]
        # Filters run in PostgreSQL's SQL (jsonb for search attributes).
        count = "/api/v1/namespaces/default/workflow-count"
        for filters, expected in [
            ({"search_attributes": '{"team": "red", "size": 3.0}'}, 1),
            ({"search_attributes": '{"team": "blue"}'}, 0),
            ({"status": "completed", "id_prefix": "pg-", "type": "Greeter"}, 1),
            ({"closed_after": "2000-01-01T00:00:00Z", "started_before": "2999-01-01"}, 1),
            ({"status": "running,failed"}, 0),
        ]:
            assert a.get(count, params=filters).json() == {"count": expected}, filters
            listed = b.get(WF, params=filters).json()["workflows"]
            assert len(listed) == expected, filters
    a.close()
    b.close()
