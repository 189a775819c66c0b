"""The `asyncio` flavour of the client: the same calls as
`tensorwasm.Client`, awaited.

    async with tensorwasm.AsyncClient() as client:
        fn = await client.function("digits")
        out = await fn(x=x)
        async for chunk in fn.stream(b"..."):
            ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx

from .client import (
    OCTET_STREAM,
    SAFETENSORS,
    STREAM_EVENTS,
    Outputs,
    _as_arrays,
    _chunk,
    _connection,
    _encode,
    _error,
    _find,
    _output_kind,
    _outputs,
    _registration,
    _retry_after,
)
from .errors import Unreachable, from_answer


class AsyncClient:
    """A tenant's connection to a TensorWasm fleet, for `asyncio`; see
    `tensorwasm.Client` for the arguments."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, headers = _connection(url, token)
        self.retries = retries
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call of the API: the 2xx answer, or the error's exception."""
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                raise Unreachable(f"{self.url}: {e}") from e
            if resp.is_success:
                return resp
            if resp.status_code in (429, 503) and attempt < self.retries:
                attempt += 1
                await asyncio.sleep(_retry_after(resp) or 1.0)
                continue
            raise _error(resp)

    async def deploy(
        self,
        module: Any,
        *,
        assets: Any = None,
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
        replace: bool = False,
    ) -> AsyncFunction:
        """As `Client.deploy`. A file of assets is read into memory here
        (httpx's async client does not stream a plain file); use the
        synchronous client for assets larger than memory."""
        params, files, opened = _registration(module, assets, config, name, replace)
        try:
            if opened is not None:
                files["assets"] = (files["assets"][0], opened.read(), SAFETENSORS)
            resp = await self.request("POST", "/functions", params=params, files=files)
        finally:
            if opened is not None:
                opened.close()
        return AsyncFunction(self, resp.json())

    async def functions(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = (await self.request("GET", "/functions")).json()["functions"]
        return listed

    async def function(self, id_or_name: str, *, output: str = "numpy") -> AsyncFunction:
        """As `Client.function`: outputs as numpy arrays, or torch tensors
        with `output="torch"`."""
        return AsyncFunction(self, _find(await self.functions(), id_or_name), output=output)


class AsyncFunction:
    """A deployed function, called with `await`."""

    def __init__(
        self, client: AsyncClient, info: Mapping[str, Any], *, output: str = "numpy"
    ) -> None:
        self.client = client
        self.info = dict(info)
        self.id: str = info["id"]
        self.name: str = info["name"]
        self.output = _output_kind(output)

    def __repr__(self) -> str:
        return f"AsyncFunction({self.name!r}, id={self.id!r})"

    async def __call__(self, **inputs: Any) -> Outputs:
        resp = await self.client.request(
            "POST",
            f"/functions/{self.id}/invoke",
            content=_encode(inputs),
            headers={"content-type": SAFETENSORS, "accept": SAFETENSORS},
        )
        return _outputs(resp, self.output)

    async def call_raw(self, data: bytes, content_type: str = OCTET_STREAM) -> bytes:
        resp = await self.client.request(
            "POST",
            f"/functions/{self.id}/invoke",
            content=data,
            headers={"content-type": content_type},
        )
        return resp.content

    async def stream(
        self, data: bytes | None = None, **inputs: Any
    ) -> AsyncGenerator[bytes | Outputs, None]:
        """As `Function.stream`, as an async generator."""
        content, ctype = (
            (data, OCTET_STREAM) if data is not None else (_encode(inputs), SAFETENSORS)
        )
        headers = {"content-type": ctype, "accept": "text/event-stream"}
        path = f"/functions/{self.id}/invoke"
        try:
            async with self.client._http.stream(
                "POST", path, content=content, headers=headers
            ) as resp:
                if not resp.is_success:
                    await resp.aread()
                    raise _error(resp)
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    await resp.aread()
                    yield _outputs(resp, self.output)
                    return
                event, lines = "message", list[str]()
                async for line in resp.aiter_lines():
                    if line:
                        field, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if field == "event":
                            event = value
                        elif field == "data":
                            lines.append(value)
                        continue
                    if lines and event in STREAM_EVENTS:
                        chunk = _chunk(event, "\n".join(lines), self.output)
                        if chunk is None:
                            return
                        yield chunk
                    event, lines = "message", []
        except httpx.TransportError as e:
            raise Unreachable(f"{self.client.url}: {e}") from e
        raise Unreachable("the stream ended without its outcome: the connection broke")

    async def submit(self, **inputs: Any) -> AsyncJob:
        resp = await self.client.request(
            "POST",
            f"/functions/{self.id}/invoke-async",
            content=_encode(inputs),
            headers={"content-type": SAFETENSORS},
        )
        return AsyncJob(self.client, resp.json()["job_id"], output=self.output)


class AsyncJob:
    """An async invocation, awaited."""

    def __init__(self, client: AsyncClient, job_id: str, *, output: str = "numpy") -> None:
        self.client = client
        self.id = job_id
        self.output = _output_kind(output)

    async def info(self) -> dict[str, Any]:
        info: dict[str, Any] = (await self.client.request("GET", f"/jobs/{self.id}")).json()
        return info

    async def result(self, timeout: float | None = None, poll: float = 0.05) -> Outputs:
        async def wait() -> Outputs:
            while True:
                info = await self.info()
                if info["status"] == "succeeded":
                    return _as_arrays((info.get("result") or {}).get("outputs", {}), self.output)
                if info["status"] == "failed":
                    err = info.get("error") or {}
                    raise from_answer(
                        0, err.get("code"), err.get("message", "the job failed"), None, None
                    )
                await asyncio.sleep(poll)

        try:
            return await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError as e:
            raise TimeoutError(f"job {self.id} not finished after {timeout} s") from e

    async def cancel(self) -> None:
        await self.client.request("DELETE", f"/jobs/{self.id}")
