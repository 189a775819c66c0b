"""The synchronous client: deploy functions, call them with numpy arrays,
run them as jobs (docs/API.md)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import TensorWasmError, Unreachable, from_answer

Array = npt.NDArray[Any]
#: A call's named outputs: numpy arrays, or torch tensors when the function
#: was asked for them (`client.function(name, output="torch")`).
Outputs = dict[str, Any]
#: What outputs come as.
OUTPUT_KINDS = ("numpy", "torch")

#: The environment variables the `tensor-wasm` CLI reads too.
URL_ENV = "TENSOR_WASM_URL"
TOKEN_ENV = "TENSOR_WASM_TOKEN"
ADMIN_URL_ENV = "TENSOR_WASM_ADMIN_URL"
ADMIN_TOKEN_ENV = "TENSOR_WASM_ADMIN_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"

SAFETENSORS = "application/x-safetensors"
OCTET_STREAM = "application/octet-stream"

#: JSON dtypes of job results, as numpy dtypes (bf16 widens to f32).
JSON_DTYPES = {
    "f32": np.float32,
    "f16": np.float16,
    "bf16": np.float32,
    "i32": np.int32,
    "i64": np.int64,
    "u8": np.uint8,
}


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _connection(url: str | None, token: str | None) -> tuple[str, dict[str, str]]:
    """The fleet's URL and the headers of every call: the arguments, else
    the CLI's environment variables."""
    token = token or os.environ.get(TOKEN_ENV)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/"), headers


def _find(functions: list[dict[str, Any]], id_or_name: str) -> dict[str, Any]:
    """The function with this id, or else this name."""
    for info in functions:
        if id_or_name in (info["id"], info["name"]):
            return info
    raise from_answer(404, "function_not_found", f"no function {id_or_name!r}", None, None)


def _error(resp: httpx.Response) -> TensorWasmError:
    """The exception an error answer stands for."""
    code: str | None = None
    message = resp.text[:500] or f"HTTP {resp.status_code}"
    try:
        body = resp.json()
        code = body["error"]["code"]
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return from_answer(
        resp.status_code,
        code,
        message,
        resp.headers.get("x-request-id"),
        _retry_after(resp),
    )


def _as_arrays(outputs: Mapping[str, Any], output: str = "numpy") -> Outputs:
    """A JSON answer's `outputs` as numpy arrays (or torch tensors)."""
    arrays: Outputs = {}
    for name, t in outputs.items():
        data = [float(v) if isinstance(v, str) else v for v in t["data"]]
        arrays[name] = np.asarray(data, dtype=JSON_DTYPES[t["dtype"]]).reshape(t["shape"])
    return _convert(arrays, output)


def _output_kind(output: str) -> str:
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output={output!r}: expected one of {', '.join(OUTPUT_KINDS)}")
    if output == "torch":
        _torch()
    return output


def _torch() -> Any:
    """The torch module, which is optional (`pip install tensorwasm[torch]`)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("torch tensors need torch: pip install 'tensorwasm[torch]'") from e
    return torch


def _is_torch(value: Any) -> bool:
    """Whether `value` is a torch tensor, without importing torch."""
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _convert(arrays: Mapping[str, Array], output: str) -> Outputs:
    """Numpy arrays as `output` asks: themselves, or torch tensors (copies,
    so that each is writable and owns its memory)."""
    if output != "torch":
        return dict(arrays)
    torch = _torch()
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


class Client:
    """A tenant's connection to a TensorWasm fleet (its proxy).

    `url` and `token` default to `TENSOR_WASM_URL` and `TENSOR_WASM_TOKEN`,
    as for the CLI. With `retries` > 0, answers 429 and 503 are tried again
    that many times, after the `Retry-After` they carry (1 s without one);
    nothing is retried otherwise.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url, headers = _connection(url, token)
        self.retries = retries
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call of the API: the 2xx answer, or the error's exception."""
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                raise Unreachable(f"{self.url}: {e}") from e
            if resp.is_success:
                return resp
            if resp.status_code in (429, 503) and attempt < self.retries:
                attempt += 1
                time.sleep(_retry_after(resp) or 1.0)
                continue
            raise _error(resp)

    @contextlib.contextmanager
    def stream(
        self, method: str, path: str, content: bytes, headers: Mapping[str, str]
    ) -> Iterator[httpx.Response]:
        """One call whose answer is read as it arrives: the 2xx answer
        (open), or the error's exception."""
        try:
            with self._http.stream(method, path, content=content, headers=headers) as resp:
                if not resp.is_success:
                    resp.read()
                    raise _error(resp)
                yield resp
        except httpx.TransportError as e:
            raise Unreachable(f"{self.url}: {e}") from e

    def deploy(
        self,
        module: str | Path | bytes,
        *,
        assets: Mapping[str, Array] | str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
        replace: bool = False,
        progress: Progress | None = None,
    ) -> Function:
        """Registers a function: `module` is a `.wasm` file or its bytes;
        `assets` a dict of arrays or a safetensors file (streamed from disk,
        never read whole, telling `progress(sent, total)` as it goes);
        `config` its settings (`deadline_ms`, …)."""
        params, files, opened = _registration(module, assets, config, name, replace, progress)
        try:
            resp = self.request("POST", "/functions", params=params, files=files)
        finally:
            if opened is not None:
                opened.close()
        return Function(self, resp.json())

    def functions(self) -> list[dict[str, Any]]:
        """The tenant's functions, as the API describes them."""
        listed: list[dict[str, Any]] = self.request("GET", "/functions").json()["functions"]
        return listed

    def function(self, id_or_name: str, *, output: str = "numpy") -> Function:
        """The function with this id, or else this name; its outputs come as
        numpy arrays, or as torch tensors with `output="torch"`."""
        return Function(self, _find(self.functions(), id_or_name), output=output)

    def job(self, job_id: str, *, output: str = "numpy") -> Job:
        return Job(self, job_id, output=output)


class Admin:
    """The admin API (docs/API.md, "Admin API"), on the proxy's admin
    listener with the admin token (`TENSOR_WASM_ADMIN_URL`,
    `TENSOR_WASM_ADMIN_TOKEN`)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = Client(
            url or os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL,
            token or os.environ.get(ADMIN_TOKEN_ENV),
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def executors(self) -> list[dict[str, Any]]:
        """The executor set, each with its live info."""
        listed: list[dict[str, Any]] = self._client.request("GET", "/admin/executors").json()[
            "executors"
        ]
        return listed

    def placements(self) -> dict[str, str]:
        """Tenant → the executor it lives on."""
        placed: dict[str, str] = self._client.request("GET", "/admin/placements").json()[
            "placements"
        ]
        return placed

    def migrate(self, tenant: str, to: str) -> dict[str, Any]:
        """Moves `tenant` live to executor `to`; the move's report."""
        report: dict[str, Any] = self._client.request(
            "POST", f"/admin/tenants/{tenant}/migrate", json={"to": to}
        ).json()
        return report

    def drain(self, executor: str) -> dict[str, Any]:
        """Moves every tenant off `executor`; the moves and failures."""
        report: dict[str, Any] = self._client.request(
            "POST", f"/admin/executors/{executor}/drain"
        ).json()
        return report

    def snapshot(self, tenant: str) -> bytes:
        """A consistent snapshot of `tenant` (it keeps running)."""
        return self._client.request("POST", f"/admin/tenants/{tenant}/snapshot").content

    def restore(self, tenant: str, snapshot: bytes) -> dict[str, Any]:
        """Replaces `tenant`'s state with `snapshot`."""
        result: dict[str, Any] = self._client.request(
            "POST",
            f"/admin/tenants/{tenant}/restore",
            content=snapshot,
            headers={"content-type": OCTET_STREAM},
        ).json()
        return result


class Function:
    """A deployed function: call it with arrays (`fn(x=array)`), raw bytes
    (`fn.call_raw(data)`), or as a job (`fn.submit(x=array)`). Inputs may
    be numpy arrays, torch tensors (bf16 included), or anything `np.asarray`
    takes; outputs are numpy arrays, or torch tensors when `output` is
    `"torch"`."""

    def __init__(self, client: Client, info: Mapping[str, Any], *, output: str = "numpy") -> None:
        self.client = client
        self.info = dict(info)
        self.id: str = info["id"]
        self.name: str = info["name"]
        self.output = _output_kind(output)

    def __repr__(self) -> str:
        return f"Function({self.name!r}, id={self.id!r})"

    def __call__(self, **inputs: Any) -> Outputs:
        """Calls it with named tensors (numpy arrays, or anything
        `np.asarray` takes); its named outputs as arrays. Raw bytes the
        function also wrote are under `"raw"` as a `uint8` array."""
        body = _encode(inputs)
        resp = self.client.request(
            "POST",
            f"/functions/{self.id}/invoke",
            content=body,
            headers={"content-type": SAFETENSORS, "accept": SAFETENSORS},
        )
        return _outputs(resp, self.output)

    def call_raw(self, data: bytes, content_type: str = OCTET_STREAM) -> bytes:
        """Calls it with a raw body; the raw answer."""
        resp = self.client.request(
            "POST",
            f"/functions/{self.id}/invoke",
            content=data,
            headers={"content-type": content_type},
        )
        return resp.content

    def stream(
        self, data: bytes | None = None, **inputs: Any
    ) -> Generator[bytes | Outputs, None, None]:
        """Calls it asking for a stream of events (docs/API.md,
        "Streaming") and yields each chunk as it arrives: bytes for a
        `text` or `bytes` chunk, a dict of arrays for a `tensors` one.
        `data` is a raw body; else the named tensors are sent. An `error`
        event raises its exception; a stream that breaks off raises
        `Unreachable`."""
        if data is not None:
            content, ctype = data, OCTET_STREAM
        else:
            content, ctype = _encode(inputs), SAFETENSORS
        headers = {"content-type": ctype, "accept": "text/event-stream"}
        with self.client.stream("POST", f"/functions/{self.id}/invoke", content, headers) as resp:
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                # An invocation that failed before its first chunk, or an
                # executor that does not stream: an ordinary answer.
                resp.read()
                yield _outputs(resp, self.output)
                return
            for event, payload in _events(resp.iter_lines()):
                if event not in STREAM_EVENTS:
                    continue
                chunk = _chunk(event, payload, self.output)
                if chunk is None:
                    return
                yield chunk
            raise Unreachable("the stream ended without its outcome: the connection broke")

    def submit(self, **inputs: Any) -> Job:
        """Runs it as an async job with named tensors."""
        body = _encode(inputs)
        resp = self.client.request(
            "POST",
            f"/functions/{self.id}/invoke-async",
            content=body,
            headers={"content-type": SAFETENSORS},
        )
        return Job(self.client, resp.json()["job_id"], output=self.output)


def _encode(inputs: Mapping[str, Any]) -> bytes:
    """Named tensors (numpy arrays, torch tensors, or anything `np.asarray`
    takes) as one safetensors body. With a torch tensor among them, torch
    writes the body, so that bf16 travels as bf16; a tensor on a GPU is
    copied to the host first."""
    if any(_is_torch(v) for v in inputs.values()):
        from safetensors.torch import save as st_save_torch

        torch = _torch()

        def host(v: Any) -> Any:
            if _is_torch(v):
                return v.detach().to("cpu").contiguous()
            return torch.from_numpy(np.ascontiguousarray(np.asarray(v)))

        return bytes(st_save_torch({k: host(v) for k, v in inputs.items()}))
    return bytes(st_save({k: np.ascontiguousarray(np.asarray(v)) for k, v in inputs.items()}))


#: Called as an assets file is sent: (bytes sent, bytes in all).
Progress = Callable[[int, int], None]


class _Reporting:
    """A file whose reads report how far they have come."""

    def __init__(self, file: IO[bytes], progress: Progress) -> None:
        self._file = file
        self._progress = progress
        self._total = os.fstat(file.fileno()).st_size
        self._sent = 0

    def fileno(self) -> int:
        return self._file.fileno()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._sent += len(data)
        self._progress(self._sent, self._total)
        return data

    def close(self) -> None:
        self._file.close()


def _registration(
    module: str | Path | bytes,
    assets: Mapping[str, Array] | str | Path | None,
    config: Mapping[str, Any] | None,
    name: str | None,
    replace: bool,
    progress: Progress | None = None,
) -> tuple[dict[str, str], dict[str, tuple[str, Any, str]], Any]:
    """The query and multipart parts of a registration, and the assets
    file opened for it (the caller closes it), reporting to `progress`
    as it is read."""
    if isinstance(module, (str, Path)):
        path = Path(module)
        wasm = path.read_bytes()
        name = name or path.stem
    else:
        wasm = module
    if not name:
        raise ValueError("a function needs a name: pass name=")
    files: dict[str, tuple[str, Any, str]] = {"module": ("module.wasm", wasm, "application/wasm")}
    opened: Any = None
    if isinstance(assets, (str, Path)):
        opened = open(assets, "rb")  # noqa: SIM115 (the caller closes it)
        if progress is not None:
            opened = _Reporting(opened, progress)
        files["assets"] = ("assets.safetensors", opened, SAFETENSORS)
    elif assets is not None:
        files["assets"] = ("assets.safetensors", _encode(assets), SAFETENSORS)
    if config is not None:
        files["config"] = ("config.json", json.dumps(dict(config)).encode(), "application/json")
    params = {"name": name}
    if replace:
        params["replace"] = "true"
    return params, files, opened


#: The events of a stream this client reads; others (of a later release)
#: are skipped.
STREAM_EVENTS = frozenset({"text", "bytes", "tensors", "error", "end"})


def _chunk(event: str, data: str, output: str = "numpy") -> bytes | Outputs | None:
    """What one of the `STREAM_EVENTS` gives: a chunk; None at the
    stream's `end`; its exception for an `error`."""
    if event == "text":
        return data.encode()
    if event == "bytes":
        return base64.b64decode(data)
    if event == "tensors":
        return _as_arrays(json.loads(data), output)
    if event == "error":
        err = json.loads(data)["error"]
        raise from_answer(200, err.get("code"), err.get("message", ""), None, None)
    return None


def _events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Server-Sent Events from the lines of a stream, as (type, data):
    `data:` lines joined with a newline, an event ending at a blank line
    (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""
    event = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)


def _outputs(resp: httpx.Response, output: str = "numpy") -> Outputs:
    media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == SAFETENSORS:
        if output == "torch":
            # bf16 stays bf16: numpy has no such dtype.
            from safetensors.torch import load as st_load_torch

            return dict(st_load_torch(resp.content))
        return dict(st_load(resp.content))
    if media == "application/json":
        body = resp.json()
        outputs = _as_arrays(body.get("outputs", {}))
        if body.get("raw_b64"):
            outputs["raw"] = np.frombuffer(base64.b64decode(body["raw_b64"]), dtype=np.uint8)
        return _convert(outputs, output)
    return _convert({"raw": np.frombuffer(resp.content, dtype=np.uint8)}, output)


class Job:
    """An async invocation (`invoke-async`)."""

    def __init__(self, client: Client, job_id: str, *, output: str = "numpy") -> None:
        self.client = client
        self.id = job_id
        self.output = _output_kind(output)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def info(self) -> dict[str, Any]:
        """The job as the API describes it."""
        info: dict[str, Any] = self.client.request("GET", f"/jobs/{self.id}").json()
        return info

    @property
    def status(self) -> str:
        """`pending`, `running`, `succeeded` or `failed`."""
        status: str = self.info()["status"]
        return status

    def result(self, timeout: float | None = None, poll: float = 0.05) -> Outputs:
        """Waits for the job (at most `timeout` seconds); its outputs, or
        the exception of its error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.info()
            if info["status"] == "succeeded":
                return _as_arrays((info.get("result") or {}).get("outputs", {}), self.output)
            if info["status"] == "failed":
                err = info.get("error") or {}
                raise from_answer(
                    0, err.get("code"), err.get("message", "the job failed"), None, None
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} still {info['status']} after {timeout} s")
            time.sleep(poll)

    def cancel(self) -> None:
        """Cancels it while it waits, or forgets it once it has finished
        (`JobRunning` while it runs)."""
        self.client.request("DELETE", f"/jobs/{self.id}")
