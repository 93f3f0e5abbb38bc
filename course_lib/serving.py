"""Serving and operating a model (chapter 17): an HTTP server, a load test, monitoring, a registry.

- :class:`ModelRegistry` — versioned model folders with a SHA-256 checksum of the weights, a
  production pointer, promotion, rollback and retirement, kept in one JSON manifest.
- :class:`Service` — the model behind the server: a **dynamic batcher** (a worker thread that
  takes up to ``max_batch`` waiting requests and generates for them together with
  :func:`course_lib.inference.generate_padded`), embeddings, and a :class:`Monitor` that records
  every request.
- :func:`build_app` — the FastAPI app: ``GET /health``, ``POST /generate`` (JSON, or streamed
  tokens as JSON lines), ``POST /embed``, ``GET /metrics``. Requests are validated: wrong types,
  unknown fields, empty or too long prompts, ``max_new_tokens < 1`` get a 4xx with a message.
- :class:`Server` — uvicorn in a background thread on ``127.0.0.1``, on a port the system picks
  (a socket bound before the server starts: no race for a "free" port), with a bounded wait for
  readiness and a clean stop; a context manager, so an error in between still stops it.
- :func:`load_test` — bounded numbers of requests from a thread pool with httpx: latencies,
  throughput.
- :func:`psi` — the population stability index, the chapter's drift statistic.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from course_lib.gpt import GPT
from course_lib.inference import generate_padded, percentiles

# ---------------------------------------------------------------------------------------------
# Drift: the population stability index
# ---------------------------------------------------------------------------------------------


def psi(reference: torch.Tensor, current: torch.Tensor, n_bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``current`` against ``reference`` (1-D samples).

    Bins: the ``n_bins - 1`` inner edges are the reference's quantiles at ``i / n_bins``
    (``torch.quantile``, linear interpolation); a value goes to the bin of the number of edges
    ``<=`` it (``torch.bucketize(x, edges, right=True)``: a value equal to an edge goes up). With
    the shares ``e_i`` (reference) and ``a_i`` (current) clamped below at ``eps``,
    ``PSI = sum_i (a_i - e_i) ln(a_i / e_i)``. Rules of thumb: < 0.1 stable, > 0.25 a shift.
    """
    reference, current = reference.double().flatten(), current.double().flatten()
    levels = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    edges = torch.quantile(reference, levels)
    bins_e = torch.bucketize(reference, edges, right=True)  # a value on an edge goes up
    bins_a = torch.bucketize(current, edges, right=True)
    e = torch.bincount(bins_e, minlength=n_bins).double() / len(reference)
    a = torch.bincount(bins_a, minlength=n_bins).double() / len(current)
    e, a = e.clamp(min=eps), a.clamp(min=eps)
    return float(((a - e) * torch.log(a / e)).sum())


# ---------------------------------------------------------------------------------------------
# The model registry
# ---------------------------------------------------------------------------------------------


class ChecksumError(RuntimeError):
    """A model file's SHA-256 differs from the one recorded when it was registered."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ModelRegistry:
    """Model versions in ``root/<name>/<version>/`` and a manifest ``root/registry.json``.

    A version is ``staged`` when registered, ``production`` when promoted (one at a time),
    ``archived`` when replaced, ``retired`` when withdrawn for good (it can no longer be loaded
    or promoted). ``history`` lists the production versions in order, so :meth:`rollback` can
    return to the one before.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = self.root / "registry.json"
        if not self.manifest.exists():
            self._write({})

    def _read(self) -> dict:
        return json.loads(self.manifest.read_text(encoding="utf-8"))

    def _write(self, data: dict) -> None:
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.manifest)  # atomic: a reader never sees half a manifest

    def register(self, name: str, version: str, model: GPT, tokenizer, metrics: dict | None = None) -> str:
        """Save ``model`` (float32 weights) and ``tokenizer`` as ``name``/``version``; returns the
        weights' SHA-256. Versions are immutable: registering one twice is an error."""
        from course_lib.lm_train import export_model

        data = self._read()
        versions = data.setdefault(name, {"versions": {}, "history": []})["versions"]
        if version in versions:
            raise ValueError(f"{name} {version} is already registered; versions are immutable")
        folder = export_model(model, tokenizer, self.root / name / version, metrics or {},
                              dtype=torch.float32)
        digest = sha256_file(folder / "model.safetensors")
        versions[version] = {"sha256": digest, "status": "staged", "created": time.time()}
        self._write(data)
        return digest

    def versions(self, name: str) -> dict[str, dict]:
        return self._read()[name]["versions"]

    def production(self, name: str) -> str | None:
        history = self._read()[name]["history"]
        return history[-1] if history else None

    def promote(self, name: str, version: str) -> None:
        data = self._read()
        entry = data[name]
        if entry["versions"][version]["status"] == "retired":
            raise ValueError(f"{name} {version} is retired and cannot be promoted")
        if entry["history"]:
            entry["versions"][entry["history"][-1]]["status"] = "archived"
        entry["versions"][version]["status"] = "production"
        entry["history"].append(version)
        self._write(data)

    def rollback(self, name: str) -> str:
        """Make the previous production version (not retired) production again; returns it."""
        data = self._read()
        entry = data[name]
        history = entry["history"]
        earlier = [v for v in history[:-1] if entry["versions"][v]["status"] != "retired"]
        if not earlier:
            raise ValueError(f"{name} has no earlier version to roll back to")
        entry["versions"][history[-1]]["status"] = "archived"
        entry["versions"][earlier[-1]]["status"] = "production"
        history.append(earlier[-1])
        self._write(data)
        return earlier[-1]

    def retire(self, name: str, version: str) -> None:
        """Withdraw a version for good; the production version must be replaced first."""
        data = self._read()
        entry = data[name]
        if entry["history"] and entry["history"][-1] == version:
            raise ValueError(f"{name} {version} is in production: promote or roll back first")
        entry["versions"][version]["status"] = "retired"
        self._write(data)

    def load(self, name: str, version: str | None = None, device: torch.device | str = "cpu"):
        """``(model, tokenizer, info)`` for ``version`` (default: production), after checking the
        weights' SHA-256 against the manifest (:class:`ChecksumError` when they differ)."""
        from course_lib.lm_train import load_model

        version = version or self.production(name)
        if version is None:
            raise ValueError(f"{name} has no production version")
        info = self.versions(name)[version]
        if info["status"] == "retired":
            raise ValueError(f"{name} {version} is retired")
        folder = self.root / name / version
        digest = sha256_file(folder / "model.safetensors")
        if digest != info["sha256"]:
            raise ChecksumError(f"{name} {version}: model.safetensors has SHA-256 {digest[:12]}..., "
                                f"the registry recorded {info['sha256'][:12]}...: the file changed")
        model, tokenizer, _ = load_model(folder, device)
        return model, tokenizer, {"name": name, "version": version, **info}


# ---------------------------------------------------------------------------------------------
# Monitoring
# ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One served request."""

    time: float
    endpoint: str
    version: str
    latency_s: float
    prompt_tokens: int
    new_tokens: int
    batch_size: int = 1
    distinct: float = 1.0  # distinct tokens / tokens of the output: low when a model repeats itself


@dataclass
class Monitor:
    """Every served request's record (thread-safe), and summaries of them."""

    records: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)

    def snapshot(self, endpoint: str | None = None) -> list[Record]:
        with self.lock:
            return [r for r in self.records if endpoint is None or r.endpoint == endpoint]

    def summary(self) -> dict[str, Any]:
        rows = self.snapshot("generate")
        out: dict[str, Any] = {"requests": len(self.snapshot()), "generate_requests": len(rows)}
        if rows:
            p50, p95, p99 = percentiles([r.latency_s * 1000 for r in rows], [50, 95, 99])
            out.update(latency_ms={"p50": p50, "p95": p95, "p99": p99},
                       mean_prompt_tokens=sum(r.prompt_tokens for r in rows) / len(rows),
                       mean_batch_size=sum(r.batch_size for r in rows) / len(rows))
        return out


# ---------------------------------------------------------------------------------------------
# The service: a dynamic batcher in front of the model
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    tokens: Queue = field(default_factory=Queue)  # ints, then None when done
    batch_size: int = 0


class Service:
    """A model, its tokenizer and version, and a worker thread that batches generation requests:
    it waits up to ``max_wait_s`` for up to ``max_batch`` requests with the same temperature and
    runs them as one left-padded batch (static within a batch: the batch lasts as long as its
    longest request). Tokens go to each request's queue as they are made, so they can be
    streamed."""

    def __init__(self, model: GPT, tokenizer, version: str = "v1", sha256: str = "", max_batch: int = 8,
                 max_wait_s: float = 0.005, max_new_tokens_limit: int = 128, seed: int = 0) -> None:
        self.model, self.tokenizer, self.version, self.sha256 = model.eval(), tokenizer, version, sha256
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.max_new_tokens_limit = max_new_tokens_limit
        self.monitor = Monitor()
        self.pending: deque[Job] = deque()
        self.condition = threading.Condition()
        self.generator = torch.Generator().manual_seed(seed)
        self.healthy = True
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="batcher", daemon=True)
        self.worker.start()

    # -- model management ----------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def swap(self, model: GPT, tokenizer, version: str, sha256: str = "") -> None:
        """Serve another model from the next batch on (a deployment or a rollback)."""
        with self.condition:
            self.model, self.tokenizer, self.version, self.sha256 = model.eval(), tokenizer, version, sha256

    def close(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        self.worker.join(timeout=10)

    # -- requests ------------------------------------------------------------------------------
    def submit(self, prompt: list[int], max_new_tokens: int, temperature: float) -> Job:
        job = Job(prompt, max_new_tokens, temperature)
        with self.condition:
            self.pending.append(job)
            self.condition.notify_all()
        return job

    def _take_batch(self) -> list[Job]:
        with self.condition:
            while not self.pending and not self.stopping:
                self.condition.wait(timeout=0.1)
            if self.stopping:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while len(self.pending) < self.max_batch and time.monotonic() < deadline:
                self.condition.wait(timeout=max(0.0, deadline - time.monotonic()))
            batch = self._compatible(list(self.pending))
            for job in batch:
                self.pending.remove(job)
            return batch

    def _compatible(self, waiting: list[Job]) -> list[Job]:
        """The first waiting job and those after it that share its temperature and, padded
        together, still fit in the context (longest prompt + most new tokens <= block_size)."""
        batch = [waiting[0]]
        for job in waiting[1:]:
            if len(batch) == self.max_batch:
                break
            width = max(len(j.prompt) for j in [*batch, job])
            new = max(j.max_new_tokens for j in [*batch, job])
            if job.temperature == batch[0].temperature and width + new <= self.block_size:
                batch.append(job)
        return batch

    def _work(self) -> None:
        while not self.stopping:
            batch = self._take_batch()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        longest = max(j.max_new_tokens for j in batch)
        for job in batch:
            job.batch_size = len(batch)

        def on_step(step: int, tokens: torch.Tensor) -> None:
            for job, token in zip(batch, tokens.tolist(), strict=True):
                if step < job.max_new_tokens:
                    job.tokens.put(int(token))

        try:
            with torch.inference_mode():
                generate_padded(self.model, [j.prompt for j in batch], longest, pad_id=0, on_step=on_step,
                                temperature=batch[0].temperature, generator=self.generator)
        except Exception as error:  # noqa: BLE001 - every waiting request must hear about it
            for job in batch:
                job.tokens.put(error)
        for job in batch:
            job.tokens.put(None)

    def stream(self, job: Job) -> Iterator[int]:
        """The job's tokens as they come; raises what the worker raised."""
        while (token := job.tokens.get(timeout=120)) is not None:
            if isinstance(token, Exception):
                raise token
            yield token

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings: the mean of the GPT's final hidden states over each text's
        tokens (a simple pooling; chapter 12's MiniLM is made for this, the GPT is not)."""
        rows = []
        for text in texts:
            ids = self.tokenizer.encode(text)[-self.block_size:]
            hidden = self.model.hidden_states(torch.tensor([ids], device=_device(self.model)))[0]
            rows.append(torch.nn.functional.normalize(hidden.mean(dim=0).float(), dim=0).cpu())
        return torch.stack(rows)


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# The HTTP app
# ---------------------------------------------------------------------------------------------

MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 256


class GenerateRequest(BaseModel):
    """``POST /generate``'s body. strict: ``"5"`` is not an int and ``1`` is not a bool; extra
    fields forbidden: a misspelt field is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(default=20, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    stream: bool = False


class EmbedRequest(BaseModel):
    """``POST /embed``'s body: 1 to 64 non-empty texts."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]] = Field(
        min_length=1, max_length=64)


def build_app(service: Service):
    """The FastAPI app serving ``service``."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse

    app = FastAPI(title="course GPT", version="1")

    @app.get("/health")
    def health() -> dict:
        if not service.healthy or not service.worker.is_alive():
            raise HTTPException(503, "the model is not ready")
        return {"status": "ok", "version": service.version, "sha256": service.sha256,
                "block_size": service.block_size}

    @app.get("/metrics")
    def metrics() -> dict:
        return {"version": service.version, **service.monitor.summary()}

    @app.post("/generate")
    def generate(request: GenerateRequest):
        start = time.perf_counter()
        ids = service.tokenizer.encode(request.prompt)
        if request.max_new_tokens > service.max_new_tokens_limit:
            raise HTTPException(422, f"max_new_tokens={request.max_new_tokens} is above this server's "
                                     f"limit of {service.max_new_tokens_limit}")
        if len(ids) + request.max_new_tokens > service.block_size:
            raise HTTPException(422, f"the prompt is {len(ids)} tokens; with max_new_tokens="
                                     f"{request.max_new_tokens} that exceeds the model's context of "
                                     f"{service.block_size} tokens")
        version = service.version
        job = service.submit(ids, request.max_new_tokens, request.temperature)

        def record(tokens: list[int]) -> None:
            distinct = len(set(tokens)) / max(1, len(tokens))
            service.monitor.add(Record(time.time(), "generate", version, time.perf_counter() - start,
                                       len(ids), len(tokens), job.batch_size, distinct))

        if request.stream:
            return StreamingResponse(_stream_lines(service, job, record), media_type="application/x-ndjson")
        tokens = list(service.stream(job))
        record(tokens)
        return {"text": service.tokenizer.decode(tokens), "tokens": tokens, "version": version,
                "prompt_tokens": len(ids), "batch_size": job.batch_size}

    @app.post("/embed")
    def embed(request: EmbedRequest) -> dict:
        start = time.perf_counter()
        vectors = service.embed(request.texts)
        service.monitor.add(Record(time.time(), "embed", service.version, time.perf_counter() - start,
                                   0, 0, len(request.texts)))
        return {"embeddings": vectors.tolist(), "dim": vectors.shape[1], "version": service.version}

    return app


def _stream_lines(service: Service, job: Job, record: Callable[[list[int]], None]) -> Iterator[str]:
    tokens = []
    for token in service.stream(job):
        tokens.append(token)
        yield json.dumps({"token": token, "text": service.tokenizer.decode([token])}) + "\n"
    record(tokens)
    yield json.dumps({"done": True, "tokens": len(tokens)}) + "\n"


# ---------------------------------------------------------------------------------------------
# Running it: uvicorn on loopback in a thread
# ---------------------------------------------------------------------------------------------


class Server:
    """``app`` served by uvicorn on ``host`` (loopback) in a daemon thread.

    ``with Server(app) as server:`` starts it, waits at most ``ready_timeout`` seconds for
    ``GET /health`` to answer 200, and stops it on leaving the block, error or not. The port is
    the one the system gave a socket bound before the server starts.
    """

    def __init__(self, app, host: str = "127.0.0.1", ready_timeout: float = 30.0) -> None:
        self.app, self.host, self.ready_timeout = app, host, ready_timeout
        self.port: int | None = None
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Server:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="uvicorn", daemon=True)
        self.thread.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it was ready")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError as error:
                last = error
            time.sleep(0.05)
        raise TimeoutError(f"the server on {self.url} was not ready after {self.ready_timeout} s: {last}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def client(url: str, connections: int = 16, timeout: float = 60.0):
    """An httpx client for ``url``; ``trust_env=False``: a proxy set in the environment must not
    capture requests to loopback."""
    import httpx

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.Client(base_url=url, timeout=timeout, limits=limits, trust_env=False)


# ---------------------------------------------------------------------------------------------
# The load test
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """A load test's raw measurements: one latency per request, the wall time of the whole run."""

    concurrency: int
    latencies_s: list[float]
    wall_s: float
    new_tokens: int
    errors: int

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s

    def row(self) -> dict[str, float]:
        p50, p95, p99 = percentiles([t * 1000 for t in self.latencies_s], [50, 95, 99])
        return {"concurrency": self.concurrency, "requests": len(self.latencies_s), "errors": self.errors,
                "req/s": self.requests_per_s, "tok/s": self.tokens_per_s,
                "p50 ms": p50, "p95 ms": p95, "p99 ms": p99}


def load_test(url: str, payloads: Sequence[dict], concurrency: int, timeout: float = 120.0) -> LoadResult:
    """Send every payload of ``payloads`` (a bounded list) to ``POST /generate``, ``concurrency``
    at a time from a thread pool; each request's latency is measured around its own call."""
    with client(url, connections=concurrency, timeout=timeout) as http:
        def one(payload: dict) -> tuple[float, int, bool]:
            start = time.perf_counter()
            response = http.post("/generate", json=payload)
            elapsed = time.perf_counter() - start
            ok = response.status_code == 200
            return elapsed, len(response.json()["tokens"]) if ok else 0, ok

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, payloads))
        wall = time.perf_counter() - start
    good = [r for r in results if r[2]]
    return LoadResult(concurrency, [r[0] for r in good], wall, sum(r[1] for r in good),
                      len(results) - len(good))


def stream_tokens(url: str, payload: dict, timeout: float = 60.0) -> tuple[list[dict], list[float]]:
    """``POST /generate`` with ``stream: true``: the JSON lines received and the seconds from the
    request to each line (the first is the time to first token)."""
    start = time.perf_counter()
    lines, times = [], []
    with client(url, connections=1, timeout=timeout) as http, \
            http.stream("POST", "/generate", json={**payload, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line:
                lines.append(json.loads(line))
                times.append(time.perf_counter() - start)
    return lines, times


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic and p-value (scipy)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(list(a), list(b))
    return float(result.statistic), float(result.pvalue)


def psi_label(value: float) -> str:
    if math.isnan(value):
        return "undefined"
    return "stable" if value < 0.1 else "moderate shift" if value < 0.25 else "shift"
