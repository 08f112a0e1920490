"""The HTTP API over real HTTP: a uvicorn server and a worker in threads, httpx as client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_harness import ServerThread, WorkerThread
from server_app import TASK_QUEUE, make_worker
from tether.server import ApiKeys

WF = "/api/v1/namespaces/{ns}/workflows"


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return "sqlite:///" + os.path.join(tmp_path_factory.mktemp("api"), "api.db")


@pytest.fixture(scope="module")
def worker(db_url: str) -> Iterator[WorkerThread]:
    with WorkerThread(db_url, make_worker) as w:
        yield w


@pytest.fixture(scope="module")
def server(db_url: str, worker: WorkerThread) -> Iterator[ServerThread]:
    with ServerThread(db_url, max_body_bytes=64 * 1024, max_payload_bytes=8 * 1024) as s:
        yield s


@pytest.fixture
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def wf(ns: str = "default", suffix: str = "") -> str:
    return WF.format(ns=ns) + suffix


def start(http: httpx.Client, wtype: str, *args: Any, ns: str = "default", **extra: Any) -> str:
    wid = extra.pop("workflow_id", None) or f"{wtype.lower()}-{uuid.uuid4().hex[:8]}"
    body = {
        "workflow_type": wtype,
        "task_queue": TASK_QUEUE,
        "workflow_id": wid,
        "args": list(args),
        **extra,
    }
    r = http.post(wf(ns), json=body)
    assert r.status_code == 201, r.text
    assert r.json()["workflow_id"] == wid
    return wid


def wait_first_task(http: httpx.Client, wid: str, ns: str = "default") -> None:
    """Wait until a worker ran the workflow's first task (its run method has started)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events = http.get(wf(ns, f"/{wid}/history")).json()["events"]
        if any(e["type"] == "WorkflowTaskCompleted" for e in events):
            return
        time.sleep(0.02)
    raise AssertionError(f"no worker ran {wid}")


def test_health_readiness_and_openapi(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/api/v1/namespaces/{namespace}/workflows/{workflow_id}/result" in doc["paths"]
    assert "StartWorkflowRequest" in doc["components"]["schemas"]


def test_start_signal_query_update_result_history_list(http: httpx.Client) -> None:
    wid = start(http, "Greeter", "Ada")
    # Same id while running: conflict.
    r = http.post(
        wf(),
        json={
            "workflow_type": "Greeter",
            "task_queue": TASK_QUEUE,
            "workflow_id": wid,
            "args": ["Bob"],
        },
    )
    assert r.status_code == 409 and r.json()["error"] == "already_started"
    # use_existing returns the running run.
    first_run = http.get(wf(suffix=f"/{wid}")).json()["run_id"]
    r = http.post(
        wf(),
        json={
            "workflow_type": "Greeter",
            "task_queue": TASK_QUEUE,
            "workflow_id": wid,
            "id_conflict_policy": "use_existing",
        },
    )
    assert r.status_code == 201 and r.json()["run_id"] == first_run

    wait_first_task(http, wid)
    d = http.get(wf(suffix=f"/{wid}")).json()
    assert d["status"] == "running" and d["workflow_type"] == "Greeter"
    assert d["namespace"] == "default" and d["task_queue"] == TASK_QUEUE

    r = http.post(wf(suffix=f"/{wid}/queries/current"), json={})
    assert r.status_code == 200, r.text
    assert r.json() == {"result": "Hello, Ada!"}

    r = http.post(wf(suffix=f"/{wid}/signals/set_greeting"), json={"args": ["Hi"]})
    assert r.status_code == 202, r.text
    r = http.post(wf(suffix=f"/{wid}/updates/rename"), json={"args": ["Grace"], "update_id": "u1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"result": "Ada"}
    # The same update id again: deduplicated, same answer, handler not re-run.
    r = http.post(wf(suffix=f"/{wid}/updates/rename"), json={"args": ["Grace"], "update_id": "u1"})
    assert r.json() == {"result": "Ada"}
    # Rejected by the validator: a 400 with the reason.
    r = http.post(wf(suffix=f"/{wid}/updates/rename"), json={"args": [""]})
    assert r.status_code == 400 and r.json()["error"] == "update_failed"
    assert "name must not be empty" in r.json()["message"]
    assert http.post(wf(suffix=f"/{wid}/queries/current")).json() == {"result": "Hi, Grace!"}

    r = http.get(wf(suffix=f"/{wid}/result"))
    assert r.json()["status"] == "running"
    assert http.post(wf(suffix=f"/{wid}/signals/finish")).status_code == 202
    r = http.get(wf(suffix=f"/{wid}/result"), params={"wait": 20})
    assert r.status_code == 200
    assert r.json()["status"] == "completed" and r.json()["result"] == "Hi, Grace!"

    # History, paged.
    full = http.get(wf(suffix=f"/{wid}/history"), params={"limit": 1000}).json()
    types = [e["type"] for e in full["events"]]
    assert types[0] == "WorkflowStarted" and "WorkflowCompleted" in types
    assert "SignalReceived" in types and full["next_after_seq"] is None
    paged: list[dict[str, Any]] = []
    after = 0
    while True:
        page = http.get(wf(suffix=f"/{wid}/history"), params={"after_seq": after, "limit": 2})
        data = page.json()
        assert len(data["events"]) <= 2
        paged += data["events"]
        if data["next_after_seq"] is None:
            break
        after = data["next_after_seq"]
    assert paged == full["events"]

    listed = http.get(wf(), params={"status": "completed", "type": "Greeter"}).json()
    assert wid in [w["workflow_id"] for w in listed["workflows"]]
    assert all(w["status"] == "completed" for w in listed["workflows"])
    assert len(http.get(wf(), params={"limit": 1}).json()["workflows"]) == 1


def test_cancel_terminate_and_failure(http: httpx.Client) -> None:
    cancelled = start(http, "Sleeper")
    terminated = start(http, "Sleeper")
    assert http.post(wf(suffix=f"/{cancelled}/cancel"), json={"reason": "no"}).status_code == 202
    assert (
        http.post(wf(suffix=f"/{terminated}/terminate"), json={"reason": "stuck"}).status_code
        == 200
    )
    r = http.get(wf(suffix=f"/{cancelled}/result"), params={"wait": 20}).json()
    assert r["status"] == "cancelled"
    r = http.get(wf(suffix=f"/{terminated}/result"), params={"wait": 20}).json()
    assert r["status"] == "terminated"
    # Terminating a closed workflow again: 404 (nothing running), not a 5xx.
    again = http.post(wf(suffix=f"/{terminated}/terminate"))
    assert again.status_code in (404, 409), again.text

    failed = start(http, "Quick", -1, 2)
    r = http.get(wf(suffix=f"/{failed}/result"), params={"wait": 20}).json()
    assert r["status"] == "failed"
    assert "a must not be negative" in str(r["failure"])
    ok = start(http, "Quick", 2, 3)
    assert http.get(wf(suffix=f"/{ok}/result"), params={"wait": 20}).json()["result"] == 5


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "words"),
    [
        ("POST", "", {"content": b"{not json"}, 400, "invalid_json", "not valid JSON"),
        ("POST", "", {"json": ["a"]}, 400, "invalid_json", "JSON object"),
        ("POST", "", {"content": b""}, 400, "invalid_json", "needs a JSON object"),
        (
            "POST",
            "",
            {"json": {"workflow_type": 5, "task_queue": "q"}},
            422,
            "invalid_request",
            "workflow_type",
        ),
        (
            "POST",
            "",
            {"json": {"workflow_type": "Greeter", "task_queue": "q", "args": "x"}},
            422,
            "invalid_request",
            "args",
        ),
        ("POST", "", {"json": {"task_queue": "q"}}, 422, "invalid_request", "workflow_type"),
        (
            "POST",
            "",
            {"json": {"workflow_type": "G", "task_queue": "q", "bogus": 1}},
            422,
            "invalid_request",
            "bogus",
        ),
        (
            "POST",
            "",
            {"json": {"workflow_type": "G", "task_queue": "q", "id_conflict_policy": "whatever"}},
            422,
            "invalid_request",
            "id_conflict_policy",
        ),
        (
            "POST",
            "",
            {"json": {"workflow_type": "NoSuchType", "task_queue": TASK_QUEUE}},
            400,
            "unknown_workflow_type",
            "NoSuchType",
        ),
        (
            "POST",
            "",
            {"content": b'{"workflow_type": "' + b"x" * 70_000 + b'"}'},
            413,
            "body_too_large",
            "limit",
        ),
        (
            "POST",
            "",
            {
                "json": {
                    "workflow_type": "Greeter",
                    "task_queue": TASK_QUEUE,
                    "args": ["x" * 10_000],
                }
            },
            413,
            "payload_too_large",
            "over the limit",
        ),
        (
            "POST",
            "/x/signals/s",
            {"json": {"args": [list(range(5000))]}},
            413,
            "payload_too_large",
            "over the limit",
        ),
        ("GET", "/nope", {}, 404, "not_found", "'nope'"),
        ("GET", "/nope/result", {}, 404, "not_found", "'nope'"),
        ("GET", "/nope/history", {}, 404, "not_found", "'nope'"),
        ("POST", "/nope/signals/finish", {}, 404, "not_found", "'nope'"),
        ("POST", "/nope/queries/current", {}, 404, "not_found", "'nope'"),
        ("POST", "/nope/cancel", {}, 404, "not_found", "'nope'"),
        ("POST", "/nope/terminate", {}, 404, "not_found", "'nope'"),
        ("GET", "?limit=abc", {}, 400, "invalid_parameter", "limit"),
        ("GET", "?limit=0", {}, 400, "invalid_parameter", "limit"),
        ("GET", "?status=bogus", {}, 400, "invalid_parameter", "status"),
        (
            "POST",
            "/x/queries/current",
            {"json": {"timeout": "soon"}},
            422,
            "invalid_request",
            "timeout",
        ),
        ("POST", "/x/signals/s", {"json": {"args": {"a": 1}}}, 422, "invalid_request", "args"),
        ("GET", "?started_after=yesterday", {}, 400, "invalid_parameter", "ISO 8601"),
        ("GET", "?closed_before=nan", {}, 400, "invalid_parameter", "epoch seconds"),
        ("GET", "?started_after=10&started_before=5", {}, 400, "invalid_parameter", "earlier"),
        ("GET", "?status=running,bogus", {}, 400, "invalid_parameter", "bogus"),
        ("GET", "?search_attributes={bad", {}, 400, "invalid_parameter", "not valid JSON"),
        ("GET", "?search_attributes=[1]", {}, 400, "invalid_parameter", "JSON object"),
        ("GET", '?search_attributes={"a":null}', {}, 400, "invalid_parameter", "booleans"),
        ("GET", '?search_attributes={"a b":1}', {}, 400, "invalid_parameter", "'a b'"),
        ("GET", "?page_token=zzz", {}, 400, "invalid_parameter", "page_token"),
        ("GET", "/x/history?follow=maybe", {}, 400, "invalid_parameter", "follow"),
        ("GET", "/nope/history?follow=true", {}, 404, "not_found", "'nope'"),
        (
            "POST",
            "/update-with-start",
            {"json": {"workflow_type": "Greeter", "task_queue": "q", "workflow_id": "w"}},
            422,
            "invalid_request",
            "update",
        ),
        (
            "POST",
            "/signal-with-start",
            {"json": {"workflow_type": "Greeter", "task_queue": "q"}},
            422,
            "invalid_request",
            "signal",
        ),
    ],
)
def test_bad_input_is_a_clear_4xx(
    http: httpx.Client,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
    words: str,
) -> None:
    r = http.request(method, wf(suffix=path), **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code
    assert words in body["message"]


def test_bad_input_against_a_running_workflow(http: httpx.Client) -> None:
    wid = start(http, "Greeter", "Eve")
    r = http.post(wf(suffix=f"/{wid}/signals/no_such_signal"), json={"args": []})
    assert r.status_code == 400 and "no signal handler 'no_such_signal'" in r.json()["message"]
    r = http.post(wf(suffix=f"/{wid}/updates/no_such_update"), json={})
    assert r.status_code == 400 and "no update handler" in r.json()["message"]
    r = http.post(wf(suffix=f"/{wid}/queries/no_such_query"), json={})
    assert r.status_code == 400 and "no query handler" in r.json()["message"]
    r = http.get(wf(suffix=f"/{wid}/result"), params={"wait": "-1"})
    assert r.status_code == 400 and "wait" in r.json()["message"]
    r = http.get(wf(suffix=f"/{wid}/history"), params={"after_seq": "x"})
    assert r.status_code == 400
    r = http.get("/api/v1/namespaces/bad%20ns!/workflows")
    assert r.status_code == 400 and r.json()["error"] == "invalid_namespace"
    r = http.delete(wf(suffix=f"/{wid}"))
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    history = http.get(wf(suffix=f"/{wid}/history")).json()["events"]
    assert [e["type"] for e in history].count("SignalReceived") == 0
    http.post(wf(suffix=f"/{wid}/terminate"))


def test_query_without_a_worker_times_out_with_504(http: httpx.Client) -> None:
    r = http.post(
        wf(), json={"workflow_type": "Greeter", "task_queue": "nobody-serves-this", "args": ["x"]}
    )
    assert r.status_code == 201
    wid = r.json()["workflow_id"]
    r = http.post(wf(suffix=f"/{wid}/queries/current"), json={"timeout": 0.5})
    assert r.status_code == 504 and r.json()["error"] == "no_worker_response"
    assert "nobody-serves-this" in r.json()["message"]
    r = http.post(wf(suffix=f"/{wid}/updates/rename"), json={"args": ["y"], "timeout": 0.5})
    assert r.status_code == 504


def test_namespaces_isolate(http: httpx.Client) -> None:
    wid = f"shared-{uuid.uuid4().hex[:6]}"
    body = {"workflow_type": "Greeter", "task_queue": "nobody", "workflow_id": wid, "args": [1]}
    ra = http.post(wf("team-a"), json={**body, "memo": {"team": "a"}})
    rb = http.post(wf("team-b"), json={**body, "memo": {"team": "b"}})
    assert ra.status_code == rb.status_code == 201
    assert ra.json()["run_id"] != rb.json()["run_id"]
    assert http.get(wf("team-a", f"/{wid}")).json()["memo"] == {"team": "a"}
    assert http.get(wf("team-b", f"/{wid}")).json()["memo"] == {"team": "b"}
    assert http.get(wf("team-c", f"/{wid}")).status_code == 404
    listed = http.get(wf("team-a")).json()["workflows"]
    assert [(w["workflow_id"], w["namespace"]) for w in listed] == [(wid, "team-a")]
    assert http.post(wf("team-c", f"/{wid}/terminate")).status_code == 404
    assert http.get(wf("team-b", f"/{wid}")).json()["status"] == "running"


def test_list_and_count_filters_and_pages(http: httpx.Client) -> None:
    ns = f"filters-{uuid.uuid4().hex[:6]}"
    body = {"workflow_type": "Greeter", "task_queue": "nobody", "args": ["x"]}
    for i, team in enumerate(["red", "blue", "red", "blue", "red"]):
        attrs = {"team": team, "n": i, "vip": i == 0}
        r = http.post(
            wf(ns), json={**body, "workflow_id": f"order-{i}", "search_attributes": attrs}
        )
        assert r.status_code == 201, r.text
    http.post(wf(ns), json={**body, "workflow_type": "Sleeper", "workflow_id": "Order-x"})
    assert http.post(wf(ns, "/order-1/terminate")).status_code == 200
    count_url = f"/api/v1/namespaces/{ns}/workflow-count"

    def count(**params: Any) -> int:
        r = http.get(count_url, params=params)
        assert r.status_code == 200, r.text
        listed = http.get(wf(ns), params=params).json()["workflows"]
        assert len(listed) == r.json()["count"]
        return int(r.json()["count"])

    assert count() == 6
    assert count(type="Greeter") == 5 and count(type="Sleeper") == 1
    assert count(status="terminated") == 1 and count(status=["running", "terminated"]) == 6
    assert count(id_prefix="order-") == 5 and count(id_prefix="Order") == 1
    assert count(search_attributes='{"team": "red"}') == 3
    assert count(search_attributes='{"team": "red", "n": 2}') == 1
    assert count(search_attributes='{"vip": true}') == 1
    assert count(search_attributes='{"n": "2"}') == 0  # a string is not the number 2
    assert count(closed_after="2000-01-01T00:00:00+00:00") == 1
    newest = http.get(wf(ns), params={"limit": 1}).json()["workflows"][0]
    assert newest["workflow_id"] == "Order-x"
    assert count(started_after=newest["start_time"]) == 1
    assert count(started_before=newest["start_time"]) == 5
    # Pages: newest first, each page continuing after the last.
    seen: list[str] = []
    token = None
    while True:
        params = {"limit": 2, **({"page_token": token} if token else {})}
        page = http.get(wf(ns), params=params).json()
        seen += [w["workflow_id"] for w in page["workflows"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == ["Order-x", "order-4", "order-3", "order-2", "order-1", "order-0"]


def test_workflow_ids_with_slashes_and_odd_characters(http: httpx.Client) -> None:
    body = {"workflow_type": "Greeter", "task_queue": "nobody", "args": ["x"]}
    ids = ["a/b", "x/result", "t/signals/s", "50%/c d?e#f", "end/", "ünï/çødé"]
    for wid in ids:
        assert http.post(wf(), json={**body, "workflow_id": wid}).status_code == 201
        encoded = quote(wid, safe="")
        assert http.get(wf(suffix=f"/{encoded}")).json()["workflow_id"] == wid
        history = http.get(wf(suffix=f"/{encoded}/history")).json()
        assert history["workflow_id"] == wid and history["events"][0]["type"] == "WorkflowStarted"
        r = http.post(wf(suffix=f"/{encoded}/signals/finish"))
        assert r.status_code == 202, (wid, r.text)
        assert http.post(wf(suffix=f"/{encoded}/terminate")).status_code == 200
        r = http.get(wf(suffix=f"/{encoded}/result")).json()
        assert (r["workflow_id"], r["status"]) == (wid, "terminated")
    # An unencoded '/' works too: the id runs up to the sub-resource.
    assert http.get(wf(suffix="/a/b")).json()["workflow_id"] == "a/b"
    assert http.get(wf(suffix="/a/b/result")).json()["workflow_id"] == "a/b"
    # ... but an id ending like a sub-resource must be encoded to mean itself.
    assert http.get(wf(suffix="/x/result")).json()["message"] == (
        "no workflow 'x' in namespace 'default'"
    )
    listed = http.get(wf(), params={"id_prefix": "t/signals"}).json()["workflows"]
    assert [w["workflow_id"] for w in listed] == ["t/signals/s"]


def test_signal_with_start_and_update_with_start(http: httpx.Client) -> None:
    wid = f"sws-{uuid.uuid4().hex[:6]}"
    sws = {
        "workflow_type": "Greeter",
        "task_queue": TASK_QUEUE,
        "workflow_id": wid,
        "args": ["Ada"],
        "signal": "set_greeting",
        "signal_args": ["Hey"],
    }
    first = http.post(wf(suffix="/signal-with-start"), json=sws)
    assert first.status_code == 200, first.text
    assert http.post(wf(suffix=f"/{wid}/queries/current")).json() == {"result": "Hey, Ada!"}
    # Running: the signal goes to the same run.
    again = http.post(wf(suffix="/signal-with-start"), json={**sws, "signal_args": ["Ho"]})
    assert again.json()["run_id"] == first.json()["run_id"]
    deadline = time.monotonic() + 15  # a query sees the signal once a workflow task ran
    while http.post(wf(suffix=f"/{wid}/queries/current")).json() != {"result": "Ho, Ada!"}:
        assert time.monotonic() < deadline, "the second signal never reached the run"
        time.sleep(0.02)
    history = http.get(wf(suffix=f"/{wid}/history")).json()["events"]
    assert [e["type"] for e in history].count("SignalReceived") == 2

    uws = {
        "workflow_type": "Greeter",
        "task_queue": TASK_QUEUE,
        "workflow_id": f"uws-{uuid.uuid4().hex[:6]}",
        "args": ["Ada"],
        "update": "rename",
        "update_args": ["Bob"],
        "update_id": "u1",
    }
    r = http.post(wf(suffix="/update-with-start"), json=uws)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["workflow_id"] == uws["workflow_id"] and answer["update_id"] == "u1"
    # Running: the next update goes to the same run.
    r = http.post(
        wf(suffix="/update-with-start"), json={**uws, "update_args": ["Cy"], "update_id": "u2"}
    )
    assert r.json()["result"] == "Bob" and answer["result"] in ("", "Ada")
    runs = http.get(wf(), params={"id_prefix": uws["workflow_id"]}).json()["workflows"]
    assert [w["status"] for w in runs] == ["running"]
    r = http.post(
        wf(suffix="/update-with-start"), json={**uws, "update_args": [""], "update_id": "u3"}
    )
    assert r.status_code == 400 and "name must not be empty" in r.json()["message"]
    r = http.post(wf(suffix="/update-with-start"), json={**uws, "workflow_type": "Nope"})
    assert r.status_code == 400 and r.json()["error"] == "unknown_workflow_type"
    for w in (wid, uws["workflow_id"]):
        http.post(wf(suffix=f"/{w}/terminate"))


def test_history_follow_streams_until_the_run_closes(http: httpx.Client) -> None:
    wid = start(http, "Greeter", "Ada")
    wait_first_task(http, wid)
    with http.stream("GET", wf(suffix=f"/{wid}/history"), params={"follow": "true"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = r.iter_lines()
        first = json.loads(next(lines))
        assert first["seq"] == 1 and first["type"] == "WorkflowStarted"
        assert http.post(wf(suffix=f"/{wid}/signals/finish")).status_code == 202
        events = [first] + [json.loads(line) for line in lines if line]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert "SignalReceived" in [e["type"] for e in events]
    assert "WorkflowCompleted" in [e["type"] for e in events[-2:]]
    # The run is closed: a follow (here from seq 2, as Server-Sent Events) ends at once.
    r = http.get(
        wf(suffix=f"/{wid}/history"),
        params={"follow": "1", "after_seq": 2},
        headers={"Accept": "text/event-stream"},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f]
    assert frames[-1] == "event: end\ndata: {}"
    data = [json.loads(f.split("data: ", 1)[1]) for f in frames[:-1]]
    assert [d["seq"] for d in data] == [e["seq"] for e in events[2:]]


KEYS = "writer-key=default:write; reader-key=default:read; other-key=other:write; all=*:write"


@pytest.fixture(scope="module")
def keyed(db_url: str, worker: WorkerThread) -> Iterator[ServerThread]:
    with ServerThread(db_url, api_keys=ApiKeys.parse(KEYS)) as s:
        yield s


def test_api_keys_refuse_and_change_nothing(keyed: ServerThread, http: httpx.Client) -> None:
    c = httpx.Client(base_url=keyed.base_url, timeout=30)
    body = {"workflow_type": "Greeter", "task_queue": TASK_QUEUE, "args": ["K"]}

    def attempt(key: str | None, wid: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return c.post(wf(), json={**body, "workflow_id": wid}, headers=headers)

    for key, status in [(None, 401), ("wrong-key", 401), ("reader-key", 403), ("other-key", 403)]:
        wid = f"auth-{uuid.uuid4().hex[:6]}"
        r = attempt(key, wid)
        assert r.status_code == status, (key, r.text)
        assert "key" in r.json()["message"]
        if key:
            assert key not in r.text  # the key is never echoed
        assert http.get(wf(suffix=f"/{wid}")).status_code == 404  # nothing started
    r = c.get(wf(), headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"

    wid = f"auth-{uuid.uuid4().hex[:6]}"
    assert attempt("writer-key", wid).status_code == 201
    wait_first_task(http, wid)
    reader = {"Authorization": "Bearer reader-key"}
    assert c.get(wf(suffix=f"/{wid}"), headers=reader).status_code == 200
    assert c.post(wf(suffix=f"/{wid}/queries/current"), headers=reader).json() == {
        "result": "Hello, K!"
    }
    before = http.get(wf(suffix=f"/{wid}/history")).json()["events"]
    for key in ("reader-key", "other-key", "nope"):
        h = {"Authorization": f"Bearer {key}"}
        for path in ("/signals/finish", "/updates/rename", "/cancel", "/terminate"):
            r = c.post(wf(suffix=f"/{wid}{path}"), json={}, headers=h)
            assert r.status_code in (401, 403), (key, path, r.text)
    assert (
        c.get(wf(suffix=f"/{wid}"), headers={"Authorization": "Bearer other-key"}).status_code
        == 403
    )
    assert http.get(wf(suffix=f"/{wid}/history")).json()["events"] == before
    assert http.get(wf(suffix=f"/{wid}")).json()["status"] == "running"
    # Health and the OpenAPI document stay open.
    assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200
    assert (
        c.post(wf(suffix=f"/{wid}/terminate"), headers={"Authorization": "Bearer all"}).status_code
        == 200
    )
    c.close()


def test_cli_through_a_server_with_api_keys(keyed: ServerThread) -> None:
    """``tether workflow ... --address``: the key from --api-key or TETHER_API_KEY."""
    from test_cli import ENV, TETHER

    def tether(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**ENV, "TETHER_ADDRESS": keyed.base_url, "TETHER_API_KEY": key or ""}
        return subprocess.run(
            [*TETHER, "workflow", *args], capture_output=True, text=True, env=env, timeout=60
        )

    with ThreadPoolExecutor(4) as pool:
        no_key = pool.submit(tether, "count")
        reader = pool.submit(tether, "count", "--api-key", "reader-key", "-o", "json")
        write = pool.submit(tether, "start", "Greeter", '"K"', "-q", "nobody", key="reader-key")
        other = pool.submit(tether, "count", "-n", "other", key="reader-key")
        assert no_key.result().returncode == 1
        assert "needs an API key" in no_key.result().stderr
        assert reader.result().returncode == 0, reader.result().stderr
        assert json.loads(reader.result().stdout)["count"] >= 0
        assert write.result().returncode == 1
        assert "may not write to namespace 'default'" in write.result().stderr
        assert other.result().returncode == 1 and "may not access" in other.result().stderr


# -- property-based fuzz of the OpenAPI document: no input gets a 5xx -------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
_segment = st.sampled_from(["default", "team-a", "nope", "Greeter", "current", "finish"]) | (
    st.text(min_size=1, max_size=30)
)


def _operations() -> list[tuple[str, str, list[str]]]:
    from tether.server.openapi import build_openapi

    doc = build_openapi("test")
    ops = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            names = [p["name"] for p in op["parameters"] if p["in"] == "query"]
            ops.append((method.upper(), path, names))
    return ops


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    op=st.sampled_from(_operations()),
    segments=st.lists(_segment, min_size=3, max_size=3),
    query=st.dictionaries(
        st.sampled_from(
            [
                *("status", "type", "limit", "wait", "after_seq", "run_id", "x", "id_prefix"),
                *("started_after", "closed_before", "search_attributes", "page_token"),
                "follow",
            ]
        ),
        st.sampled_from(["", "0", "-1", "1", "5", "1e309", "nan", "abc", "running"])
        | st.text(max_size=10),
        max_size=3,
    ),
    body=st.one_of(
        st.none(),
        _json.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {},
            optional={
                "workflow_type": _json,
                "task_queue": _json,
                "args": _json,
                "workflow_id": _json,
                "timeout": _json,
                "reason": _json,
                "update_id": _json,
                "id_reuse_policy": _json,
                "signal": _json,
                "update": _json,
            },
        ).map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=50),
    ),
)
def test_fuzz_openapi_operations_never_5xx(
    server: ServerThread,
    op: tuple[str, str, list[str]],
    segments: list[str],
    query: dict[str, str],
    body: bytes | None,
) -> None:
    method, template, _ = op
    values = iter(quote(s, safe="") for s in segments)
    path = re.sub(r"\{[^}]+\}", lambda _: next(values), template)
    if "wait" in query:
        query["wait"] = "0"  # keep long-polls short; bad values are tested elsewhere
    if "follow" in query:
        query["follow"] = "false"  # a follow of a running workflow lasts until it closes
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = c.request(method, path, params=query, content=body)
    assert r.status_code < 500, (method, path, query, body, r.text)
    if r.status_code >= 400:
        assert r.json()["message"]
