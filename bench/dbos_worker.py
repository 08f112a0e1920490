"""A DBOS application process for workload D (runs in the DBOS venv).

``--start N`` starts workflows ``d0..d{N-1}`` and then writes ``--marker``: the time
just before the first start (the driver kills this process 2 s after that time, but
not before every start has returned, so that no workflow is lost for never having
been started). Without ``--start`` the process only launches DBOS, which recovers
the pending workflows of executor ``local``. Either way it then runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from dbos import DBOS, SetWorkflowID

from bench.dbos_app import launch, steps
from bench.procs import write_atomically


async def start_all(n: int, count: int, marker: Path) -> None:
    async def start(i: int) -> None:
        with SetWorkflowID(f"d{i}"):
            await DBOS.start_workflow_async(steps, f"d{i}", count)

    first = time.time()
    await asyncio.gather(*(start(i) for i in range(n)))
    write_atomically(marker, f"{first} {time.time()}")
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--marker", type=Path)
    ns = parser.parse_args()
    launch(ns.url)
    if ns.start:
        asyncio.run(start_all(ns.start, ns.steps, ns.marker))
    else:
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
