"""Restate's driver (runs in ``bench/.peers/venv-restate``).

Topology: this driver (httpx) -> ``restate-server`` (npm package, its own process,
data in a fresh base directory per run) -> the SDK service process
(:mod:`bench.restate_app`, the "worker"). Batches use ``POST /<Wf>/<key>/run/send``
and then ``GET /restate/workflow/<Wf>/<key>/attach``; B uses the blocking
``POST /<Wf>/<key>/run``. D kills and restarts the service process.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import driver_io, procs, restate_app, sidefx, stats
from bench.config import Sizes
from bench.driver_io import DriverArgs, Results
from bench.peers import RESTATE_SERVER_BIN

INGRESS = "http://127.0.0.1:8080"
ADMIN = "http://127.0.0.1:9070"
SERVER_PORTS = (8080, 9070, 5122)
CONNECTIONS = 100


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not _port_open(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} not open after {timeout:.0f}s")
        time.sleep(0.05)


def _ensure_free(ports: Sequence[int]) -> None:
    busy = [p for p in ports if _port_open(p)]
    if busy:
        raise RuntimeError(f"ports {busy} are in use (a leftover Restate process?)")


def start_server(args: DriverArgs) -> subprocess.Popen[bytes]:
    base = args.work_dir / "restate-data"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    _ensure_free(SERVER_PORTS)
    cmd = [str(RESTATE_SERVER_BIN), "--base-dir", str(base), "--bind-ip", "127.0.0.1"]
    cmd += ["--node-name", "bench", "--no-logo", "--log-filter", "warn"]
    proc = procs.spawn(cmd, args.work_dir / "restate-server.log")
    for port in SERVER_PORTS[:2]:
        _wait_port(port)
    return proc


def start_service(log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    _ensure_free([restate_app.SERVICE_PORT])
    proc = procs.spawn([sys.executable, "-m", "bench.restate_app"], log, env)
    _wait_port(restate_app.SERVICE_PORT)
    return proc


async def register(http: httpx.AsyncClient) -> None:
    body = {"uri": f"http://127.0.0.1:{restate_app.SERVICE_PORT}", "force": True}
    for _ in range(100):
        response = await http.post(f"{ADMIN}/deployments", json=body)
        if response.status_code < 300:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"registration failed: {response.status_code} {response.text}")


async def call(http: httpx.AsyncClient, workflow: str, key: str, arg: Any) -> Any:
    for _ in range(50):  # 404 while a fresh registration propagates
        response = await http.post(f"{INGRESS}/{workflow}/{key}/run", json=arg)
        if response.status_code != 404:
            break
        await asyncio.sleep(0.1)
    if response.status_code != 200:
        raise RuntimeError(f"{workflow}/{key}: {response.status_code} {response.text}")
    return response.json()


async def send(http: httpx.AsyncClient, workflow: str, key: str, arg: Any) -> None:
    response = await http.post(f"{INGRESS}/{workflow}/{key}/run/send", json=arg)
    if response.status_code >= 300:
        raise RuntimeError(f"send {workflow}/{key}: {response.status_code} {response.text}")


async def attach(http: httpx.AsyncClient, workflow: str, key: str) -> Any:
    url = f"{INGRESS}/restate/workflow/{workflow}/{key}/attach"
    response = await http.get(url, timeout=120)
    if response.status_code != 200:
        raise RuntimeError(f"attach {workflow}/{key}: {response.status_code} {response.text}")
    return response.json()


async def send_all(http: httpx.AsyncClient, workflow: str, keys: list[str], arg: Any) -> None:
    await asyncio.gather(*(send(http, workflow, k, arg(i)) for i, k in enumerate(keys)))


async def attach_all(http: httpx.AsyncClient, workflow: str, keys: list[str]) -> list[Any]:
    return list(await asyncio.gather(*(attach(http, workflow, k) for k in keys)))


# -- workloads -------------------------------------------------------------------------
async def workload_a(http: httpx.AsyncClient, n: int, service: int) -> dict[str, float]:
    keys = [f"a{i}" for i in range(n)]
    t0 = time.perf_counter()
    await send_all(http, "Three", keys, lambda i: i)
    results = await attach_all(http, "Three", keys)
    wall = time.perf_counter() - t0
    if results != [i + 6 for i in range(n)]:
        raise AssertionError("workload A: wrong results")
    return {
        "wf_per_s": round(n / wall, 1),
        "steps_per_s": round(3 * n / wall, 1),
        "worker_rss_mib": procs.peak_rss_mib(service),
        "wall_s": round(wall, 3),
    }


async def workload_b(http: httpx.AsyncClient, n: int, prefix: str = "b") -> dict[str, float]:
    latencies = []
    for i in range(n):
        t0 = time.perf_counter()
        if await call(http, "One", f"{prefix}{i}", i) != i + 1:
            raise AssertionError("workload B: wrong result")
        latencies.append((time.perf_counter() - t0) * 1000)
    return stats.latency_metrics(latencies)


async def workload_c(http: httpx.AsyncClient, sizes: Sizes) -> dict[str, float]:
    keys = [f"c{i}" for i in range(sizes.c_workflows)]
    batch_start, t0 = time.time(), time.perf_counter()
    await send_all(http, "Sleeper", keys, lambda i: sizes.c_sleep_s)
    samples = await attach_all(http, "Sleeper", keys)
    return stats.timer_metrics(
        batch_start, [(s[0], s[1]) for s in samples], time.perf_counter() - t0
    )


async def workload_d(http: httpx.AsyncClient, args: DriverArgs) -> dict[str, float]:
    sizes = args.sizes
    side_file = args.work_dir / "side_effects.txt"
    side_file.unlink(missing_ok=True)
    env = {
        restate_app.SIDE_FILE_ENV: str(side_file),
        restate_app.STEP_SLEEP_ENV: str(sizes.d_step_s),
        restate_app.STEP_LIMIT_ENV: str(sizes.d_concurrency),
    }
    first = start_service(args.work_dir / "d-service1.log", env)
    await register(http)
    keys = [f"d{i}" for i in range(sizes.d_workflows)]
    t_first = time.time()
    # The kill comes 2 s after the first send even if sending is still going on.
    sending = asyncio.create_task(send_all(http, "Steps", keys, lambda i: sizes.d_steps))
    await asyncio.sleep(max(0.0, t_first + sizes.d_kill_after_s - time.time()))
    procs.kill9(first)
    t_kill = time.time()
    steps_at_kill = len(sidefx.read(side_file))
    t_restart = time.time()
    second = start_service(args.work_dir / "d-service2.log", env)
    await sending
    try:
        results = await attach_all(http, "Steps", keys)
        t_done = time.time()
        rss = procs.peak_rss_mib(second.pid)
    finally:
        procs.kill9(second)
    lines = sidefx.read(side_file)
    after = [line.time for line in lines if line.time > t_restart]
    return {
        "recover_s": round(t_done - t_restart, 3),
        "first_step_after_restart_s": round(min(after) - t_restart, 3) if after else -1,
        **sidefx.check(lines, keys, sizes.d_steps),
        "total_s": round(t_done - t_first, 3),
        "steps_done_at_kill": steps_at_kill,
        "kill_after_start_s": round(t_kill - t_first, 3),
        "results_ok": sum(1 for r in results if r == sum(range(sizes.d_steps))),
        "worker_rss_mib": rss,
    }


async def run(args: DriverArgs) -> Results:
    server = start_server(args)
    out: Results = {}
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=300) as http:
            if any(w in args.workloads for w in "ABC"):
                service = start_service(args.work_dir / "service.log")
                await register(http)
                await workload_b(http, args.sizes.warmup_workflows, prefix="warmup")
                if "A" in args.workloads:
                    out["A"] = await workload_a(http, args.sizes.a_workflows, service.pid)
                if "B" in args.workloads:
                    out["B"] = await workload_b(http, args.sizes.b_workflows)
                if "C" in args.workloads:
                    out["C"] = await workload_c(http, args.sizes)
                procs.kill9(service)  # stateless; SIGTERM waits ~15 s on open HTTP/2 streams
            if "D" in args.workloads:
                out["D"] = await workload_d(http, args)
            server_rss = procs.peak_rss_mib(server.pid)
            for metrics in out.values():
                metrics["server_rss_mib"] = server_rss
    finally:
        procs.stop(server, timeout=30)
    return out


def main() -> None:
    procs.exit_on_sigterm()
    args = driver_io.parse()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        driver_io.write(args.out, asyncio.run(run(args)))
    finally:
        procs.cleanup()


if __name__ == "__main__":
    main()
