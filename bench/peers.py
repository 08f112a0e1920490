"""Installs the peers into their own virtual environments under ``bench/.peers/``.

Each peer gets ``bench/.peers/venv-<peer>``; an ``.installed`` stamp that holds the
requirement list makes a second call a no-op until the requirements change.
Restate's server binary comes from the npm package ``@restatedev/restate-server``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.paths import PEERS_DIR


@dataclass(frozen=True)
class PeerEnv:
    name: str
    requirements: tuple[str, ...]
    npm_packages: tuple[str, ...] = ()

    @property
    def venv(self) -> Path:
        return PEERS_DIR / f"venv-{self.name}"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def npm_dir(self) -> Path:
        return PEERS_DIR / f"npm-{self.name}"


DBOS = PeerEnv("dbos", ("dbos",))
RESTATE = PeerEnv(
    "restate",
    ("restate-sdk", "hypercorn", "httpx"),
    npm_packages=("@restatedev/restate-server",),
)
ENVS = {env.name: env for env in (DBOS, RESTATE)}

RESTATE_SERVER_BIN = (
    RESTATE.npm_dir / "node_modules/@restatedev/restate-server-linux-x64/bin/restate-server"
)


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print(f"  $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"command failed ({done.returncode}): {' '.join(cmd)}")


def ensure(env: PeerEnv) -> Path:
    """Create ``env``'s virtual environment (and npm packages) unless already done."""
    stamp = env.venv / ".installed"
    wanted = "\n".join(env.requirements + env.npm_packages)
    if stamp.exists() and stamp.read_text() == wanted:
        return env.python
    print(f"installing peer {env.name} into {env.venv}", file=sys.stderr, flush=True)
    if env.venv.exists():
        shutil.rmtree(env.venv)
    _run([sys.executable, "-m", "venv", str(env.venv)])
    _run([str(env.python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    _run([str(env.python), "-m", "pip", "install", "-q", *env.requirements])
    if env.npm_packages:
        env.npm_dir.mkdir(parents=True, exist_ok=True)
        if not (env.npm_dir / "package.json").exists():
            _run(["npm", "init", "-y"], cwd=env.npm_dir)
        _run(["npm", "install", "--no-audit", "--no-fund", *env.npm_packages], cwd=env.npm_dir)
    stamp.write_text(wanted)
    return env.python


def main() -> None:
    names = sys.argv[1:] or list(ENVS)
    for name in names:
        ensure(ENVS[name])


if __name__ == "__main__":
    main()
