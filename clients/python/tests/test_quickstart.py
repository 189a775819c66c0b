"""The README's Python quickstart, run as written against `tensor-wasm up`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .conftest import ROOT, _free_port


def _quickstart() -> str:
    """The Python the README's quickstart feeds to the interpreter."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<<'PY'\n(.*?)\nPY\n", readme, re.S)
    assert found, "the README has a Python quickstart"
    return found.group(1)


def test_the_readme_quickstart_works_against_tensor_wasm_up(examples_wasm: Path) -> None:
    binary = Path(os.environ.get("TENSORWASM_BIN", ROOT / "target/debug/tensor-wasm"))
    state = Path(tempfile.mkdtemp(prefix="tensorwasm-up-"))
    port, admin = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSOR_WASM_")}
    up = subprocess.Popen(
        [
            str(binary),
            "up",
            "--device",
            "cpu",
            "--state-dir",
            str(state),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        token_file = state / "dev-token"
        url = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        while True:
            assert time.monotonic() - start < 120, "tensor-wasm up never served"
            if token_file.exists():
                token = token_file.read_text().strip()
                try:
                    headers = {"authorization": f"Bearer {token}"}
                    if httpx.get(f"{url}/functions", headers=headers).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        ran = subprocess.run(
            [sys.executable, "-"],
            input=_quickstart(),
            text=True,
            capture_output=True,
            cwd=ROOT,
            env=dict(env, TENSOR_WASM_URL=url, TENSOR_WASM_TOKEN=token),
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        labels = ran.stdout.strip().strip("[]").split()
        assert len(labels) == 2 and all(v.isdigit() for v in labels), ran.stdout
    finally:
        up.terminate()
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
        shutil.rmtree(state, ignore_errors=True)
