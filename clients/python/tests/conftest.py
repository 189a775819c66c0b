"""A real fleet for the client's tests: one CPU executor and a proxy, the
`tensor-wasm` binary the workspace build made (TENSORWASM_BIN to choose
another), on loopback ports; the example functions deployed on it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "tok-py"
OTHER_TOKEN = "tok-other"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(url: str, headers: dict[str, str], timeout: float = 60.0) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered 200")


ADMIN_TOKEN = "py-admin-token"


@dataclass
class Fleet:
    url: str
    admin_url: str
    binary: Path
    workdir: Path

    def cli_deploy(self, wat: Path, name: str) -> None:
        """Deploys WAT through the CLI (which compiles it)."""
        subprocess.run(
            [
                str(self.binary),
                "deploy",
                str(wat),
                "--name",
                name,
                "--url",
                self.url,
                "--token",
                TOKEN,
            ],
            check=True,
            capture_output=True,
        )


@contextlib.contextmanager
def start_fleet(deploy: bool = True) -> Iterator[Fleet]:
    """An executor and a proxy of their own, stopped on exit; with
    `deploy`, the WAT examples `streaming` and `scale` deployed."""
    binary = Path(os.environ.get("TENSORWASM_BIN", ROOT / "target/debug/tensor-wasm"))
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: build the workspace (cargo build) first")
    workdir = Path(tempfile.mkdtemp(prefix="tensorwasm-py-"))
    ex_port, px_port, admin_port = _free_port(), _free_port(), _free_port()
    env = dict(
        os.environ,
        TENSOR_WASM_INTERNAL_TOKEN="py-internal-token",
        TENSOR_WASM_ADMIN_TOKEN=ADMIN_TOKEN,
        TENSOR_WASM_API_TOKENS=f"{TOKEN}:py,{OTHER_TOKEN}:other",
        TENSOR_WASM_API_RATE_LIMIT_QPS="100000",
        TENSOR_WASM_API_RATE_LIMIT_BURST="100000",
        RUST_LOG="warn",
    )
    env.pop("TENSOR_WASM_SNAPSHOT_KEY", None)
    env.pop("TENSOR_WASM_API_TOKENS_FILE", None)
    log = open(workdir / "log.txt", "w")  # noqa: SIM115 (closed at the end)
    procs = [
        subprocess.Popen(
            [
                str(binary),
                "executor",
                "--id",
                "cpu0",
                "--device",
                "cpu",
                "--listen",
                f"127.0.0.1:{ex_port}",
                "--state-dir",
                str(workdir / "ex"),
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    ]
    try:
        _wait(f"http://127.0.0.1:{ex_port}/healthz", {})
        procs.append(
            subprocess.Popen(
                [
                    str(binary),
                    "proxy",
                    "--listen",
                    f"127.0.0.1:{px_port}",
                    "--admin-listen",
                    f"127.0.0.1:{admin_port}",
                    "--state-dir",
                    str(workdir / "proxy"),
                    "--threads",
                    "2",
                    "--health-interval-ms",
                    "200",
                    "--executor",
                    f"cpu0=127.0.0.1:{ex_port}",
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
        url = f"http://127.0.0.1:{px_port}"
        _wait(f"{url}/functions", {"authorization": f"Bearer {TOKEN}"})
        fleet = Fleet(
            url=url, admin_url=f"http://127.0.0.1:{admin_port}", binary=binary, workdir=workdir
        )
        if deploy:
            fleet.cli_deploy(ROOT / "examples/wat/streaming.wat", "streaming")
            fleet.cli_deploy(ROOT / "examples/wat/scale.wat", "scale")
        yield fleet
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    with start_fleet() as f:
        yield f


@pytest.fixture()
def examples_wasm() -> Path:
    """Where scripts/build-examples puts the built examples."""
    path = ROOT / "target/examples-wasm"
    if not (path / "mlp-digits.wasm").exists():
        raise RuntimeError("run scripts/build-examples first")
    return path
