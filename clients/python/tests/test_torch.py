"""torch tensors in, and out when asked (`output="torch"`), against a real
fleet (tests/conftest.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import tensorwasm
from tensorwasm import Client

from .conftest import TOKEN, Fleet


def test_torch_tensors_in_and_torch_tensors_out(fleet: Fleet) -> None:
    with Client(fleet.url, TOKEN) as client:
        scale = client.function("scale", output="torch")
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        y = scale(x=x)["y"]
        assert isinstance(y, torch.Tensor)
        assert y.dtype == torch.float32 and y.shape == (3, 4)
        torch.testing.assert_close(y, 2 * x + 1)
        # Writable, and its own memory.
        y += 1
        # Non-contiguous, needing grad: sent as its values.
        xt = x.t().requires_grad_()
        torch.testing.assert_close(scale(x=xt)["y"], 2 * xt.detach() + 1)
        # bf16 travels as bf16, both ways (numpy has no bf16).
        xb = torch.tensor([[0.5, -1.5], [3.0, 8.0]], dtype=torch.bfloat16)
        yb = scale(x=xb)["y"]
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb, 2 * xb + 1)
        # A job's result comes as torch too (JSON carries bf16 as f32).
        job = scale.submit(x=x)
        r = job.result(timeout=60)["y"]
        assert isinstance(r, torch.Tensor)
        torch.testing.assert_close(r, 2 * x + 1)
        # torch in, numpy out unless asked.
        plain = client.function("scale")
        out = plain(x=x)["y"]
        assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(out, 2 * x.numpy() + 1)
        assert plain.output == "numpy"
        with pytest.raises(ValueError, match="output="):
            client.function("scale", output="jax")


def test_raw_answers_and_streams_come_as_torch_when_asked(fleet: Fleet) -> None:
    with Client(fleet.url, TOKEN) as client:
        streaming = client.function("streaming", output="torch")
        chunks = list(streaming.stream(b"n" + (2).to_bytes(4, "little")))
        assert chunks[:2] == [b"chunk 0\n", b"chunk 1\n"]
        last = chunks[2]
        assert isinstance(last, dict) and isinstance(last["count"], torch.Tensor)
        assert last["count"].tolist() == [2]


def test_the_asyncio_flavour_takes_and_gives_torch(fleet: Fleet) -> None:
    async def run() -> None:
        async with tensorwasm.AsyncClient(fleet.url, TOKEN) as client:
            scale = await client.function("scale", output="torch")
            x = torch.linspace(-1, 1, 8, dtype=torch.float16)
            y = (await scale(x=x))["y"]
            assert y.dtype == torch.float16
            torch.testing.assert_close(y, 2 * x + 1)
            job = await scale.submit(x=x.float())
            r = (await job.result(timeout=60))["y"]
            assert isinstance(r, torch.Tensor)
            torch.testing.assert_close(r, 2 * x.float() + 1)

    asyncio.run(run())
