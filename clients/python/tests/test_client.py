"""The client against a real fleet (tests/conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import tensorwasm
from tensorwasm import Client

from .conftest import ADMIN_TOKEN, OTHER_TOKEN, ROOT, TOKEN, Fleet

MLP = ROOT / "examples/mlp-digits"


def _heldout() -> tuple[np.ndarray, list[int]]:
    heldout = json.loads((MLP / "heldout.json").read_text())
    expected = json.loads((MLP / "expected.json").read_text())
    return np.asarray(heldout["x"], dtype=np.float32), expected["labels"]


def test_deploy_with_assets_from_disk_and_call_with_numpy(
    fleet: Fleet, examples_wasm: Path
) -> None:
    sent: list[tuple[int, int]] = []
    with Client(fleet.url, TOKEN) as client:
        fn = client.deploy(
            examples_wasm / "mlp-digits.wasm",
            assets=MLP / "weights.safetensors",
            name="digits",
            replace=True,
            progress=lambda done, total: sent.append((done, total)),
        )
        size = (MLP / "weights.safetensors").stat().st_size
        assert sent and sent[-1] == (size, size), sent[-3:]
        assert [d for d, _ in sent] == sorted(d for d, _ in sent)
        x, labels = _heldout()
        out = fn(x=x)
        assert out["labels"].dtype == np.int64
        assert out["labels"].tolist() == labels
        assert out["probs"].shape == (len(labels), 10)
        np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, rtol=1e-5)
        # By name, as another process would find it.
        assert client.function("digits").id == fn.id


def test_assets_as_arrays_and_a_job(fleet: Fleet, examples_wasm: Path) -> None:
    from safetensors.numpy import load_file

    weights = load_file(str(MLP / "weights.safetensors"))
    with Client(fleet.url, TOKEN) as client:
        fn = client.deploy(
            (examples_wasm / "mlp-digits.wasm").read_bytes(),
            assets=weights,
            name="digits-arrays",
            replace=True,
        )
        x, labels = _heldout()
        job = fn.submit(x=x[:20])
        out = job.result(timeout=60)
        assert out["labels"].tolist() == labels[:20]
        assert job.status == "succeeded"
        job.cancel()  # forgets the finished job
        with pytest.raises(tensorwasm.JobNotFound):
            job.info()


def test_raw_bytes_in_and_out(fleet: Fleet) -> None:
    with Client(fleet.url, TOKEN) as client:
        fn = client.function("streaming")
        calls, seen = np.frombuffer(fn.call_raw(b"s"), dtype=np.uint32)
        assert calls >= 1 and seen == 0
        # Chunks join the one answer when nobody asks for a stream.
        body = b"n" + (3).to_bytes(4, "little")
        answer = client.request(
            "POST",
            f"/functions/{fn.id}/invoke",
            content=body,
            headers={"content-type": "application/octet-stream", "accept": "application/json"},
        ).json()
        assert answer["outputs"]["count"]["data"] == [3]


def test_float_tensors_round_trip(fleet: Fleet) -> None:
    with Client(fleet.url, TOKEN) as client:
        scale = client.function("scale")
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        y = scale(x=x)["y"]
        np.testing.assert_array_equal(y, 2 * x + 1)


def test_every_error_is_its_own_exception(fleet: Fleet, examples_wasm: Path) -> None:
    with Client(fleet.url, "wrong-token") as client, pytest.raises(tensorwasm.Unauthorized) as e:
        client.functions()
    assert e.value.status == 401 and e.value.code == "unauthorized"
    assert e.value.request_id

    with Client(fleet.url, TOKEN) as client:
        with pytest.raises(tensorwasm.FunctionNotFound):
            client.function("nope")
        digits = client.deploy(
            examples_wasm / "mlp-digits.wasm",
            assets=MLP / "weights.safetensors",
            name="digits",
            replace=True,
        )
        with pytest.raises(tensorwasm.FunctionError) as fe:
            digits(x=np.zeros(3, np.float32))
        assert "[n, 64]" in fe.value.message
        with pytest.raises(tensorwasm.InvalidWasm):
            client.deploy(b"\0asm\x01\0\0\0garbage", name="broken")

    # Another tenant sees none of it.
    with Client(fleet.url, OTHER_TOKEN) as other, pytest.raises(tensorwasm.FunctionNotFound):
        other.function("digits")

    with Client("http://127.0.0.1:1", TOKEN) as down, pytest.raises(tensorwasm.Unreachable):
        down.functions()


def test_url_and_token_come_from_the_cli_s_environment(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSOR_WASM_URL", fleet.url)
    monkeypatch.setenv("TENSOR_WASM_TOKEN", TOKEN)
    with Client() as client:
        assert any(f["name"] == "scale" for f in client.functions())


def test_retries_honour_retry_after() -> None:
    import httpx

    answers = [
        httpx.Response(
            429,
            headers={"retry-after": "0.05"},
            json={"error": {"code": "rate_limited", "message": "slow down"}},
        ),
        httpx.Response(200, json={"functions": []}),
    ]
    seen: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        import time

        seen.append(time.monotonic())
        return answers.pop(0)

    transport = httpx.MockTransport(handler)
    with Client("http://fleet", TOKEN, retries=1, transport=transport) as client:
        assert client.functions() == []
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.05

    limited = httpx.Response(
        429,
        headers={"retry-after": "7"},
        json={"error": {"code": "rate_limited", "message": "slow down"}},
    )
    transport = httpx.MockTransport(lambda _: limited)
    with (
        Client("http://fleet", TOKEN, transport=transport) as client,
        pytest.raises(tensorwasm.RateLimited) as e,
    ):
        client.functions()
    assert e.value.retry_after == 7.0


def test_a_stream_yields_each_chunk_as_it_comes(fleet: Fleet) -> None:
    with Client(fleet.url, TOKEN) as client:
        fn = client.function("streaming")
        chunks = list(fn.stream(b"n" + (3).to_bytes(4, "little")))
        assert chunks[:3] == [b"chunk 0\n", b"chunk 1\n", b"chunk 2\n"]
        tensors = chunks[3]
        assert isinstance(tensors, dict)
        assert tensors["count"].tolist() == [3]
        assert len(chunks) == 4
        # The first chunk is there while the guest still runs: it waits
        # for its client to leave, which then cancels it.
        live = fn.stream(b"w")
        assert next(live) == b"first\n"
        live.close()
        start = time.monotonic()
        while np.frombuffer(fn.call_raw(b"s"), dtype=np.uint32)[1] < 1:
            assert time.monotonic() - start < 30, "never cancelled"
            time.sleep(0.02)
        # A function that fails before its first chunk raises at once.
        with pytest.raises(tensorwasm.FunctionNotFound):
            next(tensorwasm.Function(client, {"id": "fn-nope", "name": "x"}).stream(b"n"))


def test_admin_helpers(fleet: Fleet) -> None:
    with tensorwasm.Admin(fleet.admin_url, ADMIN_TOKEN) as admin:
        assert [e["id"] for e in admin.executors()] == ["cpu0"]
        assert admin.placements()["py"] == "cpu0"
        snap = admin.snapshot("py")
        assert len(snap) > 0
        admin.restore("py", snap)
        report = admin.migrate("py", "cpu0")  # already there: nothing moves
        assert report["tenant"] == "py"
    with (
        tensorwasm.Admin(fleet.admin_url, "wrong") as admin,
        pytest.raises(tensorwasm.Unauthorized),
    ):
        admin.executors()


def test_the_asyncio_flavour(fleet: Fleet, examples_wasm: Path) -> None:
    import asyncio

    async def run() -> None:
        async with tensorwasm.AsyncClient(fleet.url, TOKEN) as client:
            fn = await client.deploy(
                examples_wasm / "mlp-digits.wasm",
                assets=MLP / "weights.safetensors",
                name="digits-async",
                replace=True,
            )
            x, labels = _heldout()
            # Concurrent calls, each its own answer.
            outs = await asyncio.gather(*(fn(x=x[i : i + 10]) for i in range(0, 40, 10)))
            got = [int(v) for o in outs for v in o["labels"]]
            assert got == labels[:40]
            job = await fn.submit(x=x[:5])
            assert (await job.result(timeout=60))["labels"].tolist() == labels[:5]
            streaming = await client.function("streaming")
            chunks = [c async for c in streaming.stream(b"n" + (2).to_bytes(4, "little"))]
            assert chunks[:2] == [b"chunk 0\n", b"chunk 1\n"]
            assert isinstance(chunks[2], dict) and chunks[2]["count"].tolist() == [2]
            with pytest.raises(tensorwasm.FunctionNotFound):
                await client.function("nope")

    asyncio.run(run())
