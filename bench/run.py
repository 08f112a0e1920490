"""The orchestrator: ``python -m bench [--quick]`` (``make bench`` / ``make bench-quick``).

For each repetition, each system and each batch of workloads (A-C together, D, E)
it creates a fresh store, runs the system's driver in its own process (in the
system's own virtual environment), reads the driver's results and drops the store.
Repetitions are interleaved across systems so that drift in the machine's load
spreads over all of them. Writes ``bench/results/latest.json`` and prints tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import driver_io, machine, peers, results, stores, tables
from bench.config import FULL, QUICK, Sizes
from bench.paths import REPO_DIR, RESULTS_DIR, WORK_DIR
from bench.results import Sample
from bench.systems import BY_NAME, SYSTEMS, System

DEFAULT_OUT = RESULTS_DIR / "latest.json"
TIMEOUT_S = {"A": 300.0, "B": 120.0, "C": 120.0, "D": 300.0, "E": 2400.0}
"""Per workload; a driver run gets the sum for its workloads."""


@dataclass
class DriverRun:
    system: str
    workloads: str
    rep: int
    load_before: str
    cpu_probe_ms: float
    load_after: str = ""
    seconds: float = 0.0
    error: str | None = None


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller N, one repetition")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    parser.add_argument(
        "--systems",
        default=",".join(s.name for s in SYSTEMS),
        help="comma-separated (default: all): " + ", ".join(s.name for s in SYSTEMS),
    )
    parser.add_argument("--workloads", default="ABCDE", help="any of ABCDE (default all)")
    parser.add_argument("--e-workflows", type=int, help="override E's workflow count (SQLite)")
    parser.add_argument(
        "--e-reps", type=int, default=1, help="repetitions of E, which takes minutes (default 1)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--profile-a", type=Path, help="py-spy the Tether worker during A into this file"
    )
    parser.add_argument(
        "--profile-idle", action="store_true", help="with --profile-a: sample idle threads too"
    )
    ns = parser.parse_args(argv)
    unknown = [n for n in _names(ns.systems) if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}: choose from {', '.join(BY_NAME)}")
    if not ns.workloads or set(ns.workloads) - set("ABCDE"):
        parser.error(f"--workloads {ns.workloads!r}: use letters of ABCDE, e.g. AB")
    return ns


def _names(systems: str) -> list[str]:
    return [n.strip() for n in systems.split(",") if n.strip()]


def _available(selected: list[System]) -> tuple[list[System], list[str]]:
    """The selected systems that can run here, and notes on the ones that cannot."""
    notes = []
    ok = []
    pg = stores.postgres_available() if any(s.store == "postgres" for s in selected) else True
    installed: dict[str, bool] = {}
    for system in selected:
        if system.store == "postgres" and not pg:
            notes.append(f"{system.name}: skipped, no PostgreSQL at {stores.PG_SERVER}")
            continue
        env = system.peer_env
        if env is not None and env.name not in installed:
            try:
                peers.ensure(env)
                installed[env.name] = True
            except (OSError, RuntimeError) as e:
                installed[env.name] = False
                notes.append(f"peer {env.name}: install failed: {e}")
        if env is not None and not installed[env.name]:
            notes.append(f"{system.name}: skipped, its peer environment is not installed")
            continue
        ok.append(system)
    return ok, notes


@contextlib.contextmanager
def _store(kind: str, tag: str) -> Iterator[str]:
    if kind == "own":
        yield "own:"
        return
    store = stores.create(kind, tag)
    try:
        yield store.url
    finally:
        stores.drop(store)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_driver(
    system: System, workloads: str, rep: int, sizes: Sizes, env: dict[str, str]
) -> tuple[driver_io.Results, DriverRun]:
    """One driver process on a fresh store; its logs stay in ``WORK_DIR/runs/<tag>/``."""
    tag = f"{system.name}-{workloads}-{rep}"
    info = DriverRun(system.name, workloads, rep, machine.load(), machine.cpu_probe_ms())
    work_dir = WORK_DIR / "runs" / tag
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    out, log_path = work_dir / "result.json", work_dir / "driver.log"
    timeout = sum(TIMEOUT_S[w] for w in workloads)
    started = time.monotonic()
    found: driver_io.Results = {}
    with _store(system.store, tag) as url, open(log_path, "wb") as log:
        args = driver_io.DriverArgs(workloads, url, sizes, out, work_dir, system.variant)
        proc = subprocess.Popen(
            driver_io.driver_command(str(system.python), system.module, args),
            cwd=REPO_DIR,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate(proc)
            info.error = f"timed out after {timeout:.0f}s"
        except BaseException:  # Ctrl-C or a bug here: leave no driver behind
            _terminate(proc)
            raise
    if info.error is None and (proc.returncode != 0 or not out.exists()):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
        info.error = f"driver exited {proc.returncode}: " + " / ".join(tail)
    if info.error is None:
        found = driver_io.read(out)
    info.seconds = round(time.monotonic() - started, 1)
    info.load_after = machine.load()
    return found, info


def _size_labels(sizes: Sizes) -> dict[str, str]:
    return {
        "A": f"N={sizes.a_workflows}",
        "B": f"N={sizes.b_workflows}",
        "C": f"N={sizes.c_workflows}, sleep {sizes.c_sleep_s:g} s",
        "D": f"N={sizes.d_workflows} x {sizes.d_steps} steps, kill at {sizes.d_kill_after_s:g} s",
        "E": f"N={sizes.e_workflows:,} on SQLite, {sizes.e_workflows_postgres:,} on PostgreSQL",
    }


def _plan(
    ns: argparse.Namespace, systems: list[System], reps: int
) -> list[tuple[int, System, str]]:
    """(rep, system, workloads) for every driver run, repetitions interleaved."""
    plan = []
    for rep in range(1, reps + 1):
        for system in systems:
            for batch in system.batches:
                workloads = "".join(w for w in batch if w in system.workloads and w in ns.workloads)
                if workloads == "E" and rep > ns.e_reps:
                    continue
                if workloads:
                    plan.append((rep, system, workloads))
    return plan


def _compile_tether() -> None:
    """Compile Tether's modules (and the harness's) to bytecode, as pip does when it
    installs a package. The peers are installed packages with their bytecode; an
    editable install under ``PYTHONDONTWRITEBYTECODE`` (set on these machines) would
    compile Tether's modules again in every process it starts: about 0.15 s of each
    worker's start, which D's restart measures."""
    import compileall

    import tether

    compileall.compile_dir(Path(tether.__file__).parent, quiet=1)
    # The harness's own modules only: not the peers' environments under ``.peers``.
    compileall.compile_dir(REPO_DIR / "bench", maxlevels=0, quiet=1)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parse(argv)
    _compile_tether()
    sizes = QUICK if ns.quick else FULL
    if ns.e_workflows:
        sizes = Sizes(**{**asdict(sizes), "e_workflows": ns.e_workflows})
    reps = ns.reps or (1 if ns.quick else 3)
    systems, notes = _available([BY_NAME[n] for n in _names(ns.systems)])
    env = {"BENCH_PROFILE_A": str(ns.profile_a.resolve())} if ns.profile_a else {}
    if ns.profile_idle:
        env["BENCH_PROFILE_IDLE"] = "1"
    started_at, t0, load_before, probe_before = (
        time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        time.monotonic(),
        machine.load(),
        machine.cpu_probe_ms(),
    )
    samples: list[Sample] = []
    runs: list[DriverRun] = []
    for scratch in ("runs", "stores"):  # the last run's logs, and stores left by a crash
        shutil.rmtree(WORK_DIR / scratch, ignore_errors=True)
    for rep, system, workloads in _plan(ns, systems, reps):
        print(
            f"[rep {rep}/{reps}] {system.name} {workloads} (load {machine.load()}) ...",
            end=" ",
            file=sys.stderr,
            flush=True,
        )
        found, info = run_driver(system, workloads, rep, sizes, env)
        runs.append(info)
        print(info.error or f"{info.seconds:.1f} s", file=sys.stderr, flush=True)
        samples += [
            Sample(system.name, workload, metric, float(value), rep)
            for workload, values in found.items()
            for metric, value in values.items()
        ]
    run_info = {
        "mode": "quick" if ns.quick else "full",
        "command": " ".join(["python -m bench", *argv]),
        "started": started_at,
        "seconds": round(time.monotonic() - t0, 1),
        "repetitions": reps,
        "sizes": asdict(sizes),
        "size_labels": _size_labels(sizes),
        "load_before": load_before,
        "load_after": machine.load(),
        "cpu_probe_ms_before": probe_before,
        "cpu_probe_ms_after": machine.cpu_probe_ms(),
        "notes": notes,
        "driver_runs": [asdict(r) for r in runs],
    }
    doc = results.document(machine.describe(), run_info, results.aggregate(samples))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1) + "\n"
    ns.out.write_text(text)
    if ns.out == DEFAULT_OUT:  # keep the last full and the last quick run apart too
        DEFAULT_OUT.with_name(f"latest-{run_info['mode']}.json").write_text(text)
    print(tables.render(doc))
    print(f"\nwrote {ns.out}", file=sys.stderr)
    return 1 if any(r.error for r in runs) else 0
