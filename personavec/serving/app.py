"""The HTTP layer of the steering server: FastAPI + uvicorn, OpenAI's JSON and SSE over the continuous-batching engine.

``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events with
``stream: true``), ``GET /health``. A bad request is HTTP 400 with OpenAI's error object, its ``message`` one line
and ``param`` the field; the server goes on serving. A client that goes away (mid-stream, or while waiting for a
non-streamed answer) cancels its rows, which leave the batch at the next step; nothing of it is recorded.

``with running_server(ServeConfig(model=...)) as server:`` runs it on a thread (tests, benchmarks);
:func:`serve` runs it in the foreground (``personavec serve``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from personavec.errors import ConfigError, ModelError
from personavec.serving.requests import BadRequest, ServeRequest, parse_request
from personavec.serving.scheduler import (
    Admitted,
    Delta,
    Finished,
    InterventionResolver,
    Refused,
    Scheduler,
    Ticket,
    TokenLogprob,
)

if TYPE_CHECKING:
    from personavec.modeling import LoadedModel
    from personavec.store.serving import ServeSession
    from personavec.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What ``personavec serve`` serves.

    Attributes:
        model: the model (alias, directory, ``.gguf``, Hub id); requests name it by ``served_name``.
        workspace: the workspace whose vectors runs interventions name (None: inline vectors only).
        record: store every finished answer in the workspace's catalog as a generate run of this session.
        served_name: the ``model`` requests must send (default: ``model`` as given, or its directory name).
        max_batch: answers decoded together.
        max_tokens: the default and largest ``max_tokens`` of a request.
        device, dtype: where and how the model is loaded.
    """

    model: str = "smollm2-135m-instruct"
    workspace: str | None = None
    record: bool = False
    served_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    max_batch: int = 64
    max_tokens: int = 1024
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.record and self.workspace is None:
            raise ConfigError("--record stores answers in a workspace's catalog: give the workspace (-w)")
        if self.max_batch < 1 or self.max_tokens < 1:
            raise ConfigError(f"max_batch and max_tokens must be >= 1, got {self.max_batch}, {self.max_tokens}")

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        path = Path(self.model)
        return path.name if path.is_dir() and path.name else self.model


# ---------------------------------------------------------------------------------------------------- recording


class Recorder:
    """Lands finished requests in the catalog on one writer thread (the model thread never waits on DuckDB); an
    error of the writer is logged and raised again at :meth:`close`."""

    def __init__(self, ws: Workspace, session: ServeSession, model: str, catalog_lock: Any) -> None:
        self.ws = ws
        self.catalog_lock = catalog_lock
        self.session = session
        self.model = model
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-record")
        self._futures: list[concurrent.futures.Future] = []
        self._lock = threading.Lock()

    def __call__(self, ticket: Ticket, finished: list[Finished]) -> None:
        from personavec.store.serving import ServedRequest, ServedRow

        req = ticket.request
        latency = time.perf_counter() - ticket.submitted
        served = ServedRequest(
            system_prompt=req.system_prompt or "",
            question=req.question,
            endpoint=req.endpoint,
            model=self.model,
            answers=tuple(
                ServedRow(f.text, f.finish_reason, len(ticket.prompt), f.completion_tokens, latency)
                for f in sorted(finished, key=lambda f: f.index)
            ),
            interventions=[spec.as_json() for spec in req.interventions],
            applied=[
                {
                    "vector_run_id": r.vector_run_id,
                    "tau_source": r.tau_source,
                    "layers": [
                        {
                            "layer": iv.layer,
                            "kind": iv.kind,
                            "scale": iv.scale,
                            "tau": iv.tau,
                            "vector_norm": iv.vector_norm,
                            "unit_norm": iv.unit_norm,
                        }
                        for iv in r.layers
                    ],
                }
                for r in ticket.interventions
            ],
            vector_run_ids=tuple(sorted({r.vector_run_id for r in ticket.interventions if r.vector_run_id})),
            params={
                "temperature": req.temperature,
                "top_p": req.top_p,
                "seed": req.seed,
                "max_tokens": req.max_tokens,
                "stop": list(req.stop),
                "n": req.n,
                "messages": [list(m) for m in req.messages] if req.messages else None,
            },
        )
        with self._lock:
            self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
            self._futures.append(self._pool.submit(self._write, served))

    def flush(self) -> None:
        """Wait until every request handed over so far has landed (or failed)."""
        with self._lock:
            pending = list(self._futures)
        concurrent.futures.wait(pending)

    def _write(self, served: Any) -> None:
        from personavec.store.serving import record_served

        try:
            with self.catalog_lock:
                record_served(self.ws.catalog(), self.session, [served])
        except Exception:
            log.exception("recording a served answer failed")
            raise

    def close(self, status: str = "done") -> None:
        from personavec.store.serving import finish_serve_session

        self._pool.shutdown(wait=True)
        errors = [f.exception() for f in self._futures if f.exception() is not None]
        with self.catalog_lock:
            finish_serve_session(self.ws.catalog(), self.session, "failed" if errors else status,
                                 f"{len(errors)} answers failed to land: {errors[0]}" if errors else None)  # fmt: skip
        if errors:
            raise errors[0]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------- JSON


def _error_object(message: str, param: str | None, kind: str) -> dict[str, Any]:
    """OpenAI's error object, its message on one line."""
    return {"error": {"message": " ".join(str(message).split()), "type": kind, "param": param, "code": None}}


def _error(message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error") -> Any:
    return JSONResponse(_error_object(message, param, kind), status_code=status)


def _refused(error: BaseException) -> tuple[dict[str, Any], int]:
    """The error object and HTTP status of a request the scheduler refused: 400 naming the field for a bad request
    (an unknown vector; interventions that drove the logits to NaN/inf), else 500."""
    if isinstance(error, BadRequest):
        return _error_object(str(error), error.param, "invalid_request_error"), 400
    return _error_object(str(error), None, "server_error"), 500


def _chat_logprobs(items: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(a.encode())} for a, lp in t.top],
            }
            for t in items
        ]
    }


def _text_logprobs(items: tuple[TokenLogprob, ...], offset: int = 0) -> dict[str, Any]:
    offsets, at = [], offset
    for t in items:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [dict(t.top) for t in items],
        "text_offset": offsets,
    }


class _Request:
    """One HTTP request's conversation with the scheduler: events arrive on the event loop's queue."""

    def __init__(self, scheduler: Scheduler, req: ServeRequest) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

        def sink(event: Any) -> None:  # on the model thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                self.ticket.cancel()

        self.ticket = scheduler.submit(req, sink)


# ---------------------------------------------------------------------------------------------------- app


def build_app(scheduler: Scheduler, served_name: str, *, base_name: str | None = None) -> Any:
    """The FastAPI app over a started :class:`Scheduler`."""
    app = FastAPI(title="personavec serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    names = {served_name, base_name} - {None}

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        return _error(str(exc.detail), status=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        return _error(str(exc))

    @app.get("/health")
    async def health() -> Any:
        if scheduler.error is not None:  # the model thread is gone: a load balancer must see it
            return JSONResponse({"status": f"failed: {scheduler.error}", "active": 0}, status_code=503)
        return {"status": "ok", "active": scheduler.active}

    @app.get("/v1/models")
    async def models() -> Any:
        return {
            "object": "list",
            "data": [{"id": served_name, "object": "model", "created": created, "owned_by": "personavec"}],
        }

    async def complete(request: Request, endpoint: str) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(f"the request body is not valid JSON: {exc}")
        try:
            req = parse_request(body, endpoint)
        except BadRequest as exc:
            return _error(str(exc), exc.param)
        if req.model not in names:
            return _error(f"model {req.model!r} is not served here; this server serves {served_name!r}", "model")
        try:
            conv = _Request(scheduler, req)
        except ModelError as exc:
            return _error(str(exc), status=500, kind="server_error")
        first = await conv.queue.get()
        if isinstance(first, Refused):
            body, status = _refused(first.error)
            return JSONResponse(body, status_code=status)
        assert isinstance(first, Admitted)
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(
                _stream(conv, req, rid, first.prompt_tokens, served_name, created),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await _collect(request, conv, req, rid, first.prompt_tokens, served_name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, "completions")

    return app


#: Put on a request's queue when its client hangs up before a non-streamed answer is complete.
_HUNG_UP = object()


async def _collect(request: Any, conv: _Request, req: ServeRequest, rid: str, prompt_tokens: int, model: str) -> Any:
    done: dict[int, Finished] = {}

    async def watch() -> None:  # a client that hangs up before the answer cancels it
        while True:
            if await request.is_disconnected():
                conv.ticket.cancel()
                conv.queue.put_nowait(_HUNG_UP)  # the scheduler sends nothing more: end this handler too
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        while len(done) < req.n:
            ev = await conv.queue.get()
            if ev is _HUNG_UP:  # nobody reads the answer (it left this handler waiting, and shutdown then stalled)
                return _error("the client closed the connection", status=499)
            if isinstance(ev, Finished):
                done[ev.index] = ev
            elif isinstance(ev, Refused):
                body, status = _refused(ev.error)
                return JSONResponse(body, status_code=status)
    except asyncio.CancelledError:
        conv.ticket.cancel()
        raise
    finally:
        watcher.cancel()
    answers = [done[i] for i in range(req.n)]
    completion = sum(f.completion_tokens for f in answers)
    if req.endpoint == "chat":
        choices = [
            {
                "index": f.index,
                "message": {"role": "assistant", "content": f.text},
                "logprobs": _chat_logprobs(f.logprobs) if req.logprobs else None,
                "finish_reason": f.finish_reason,
            }
            for f in answers
        ]
        obj = "chat.completion"
    else:
        choices = [
            {
                "index": f.index,
                "text": f.text,
                "logprobs": _text_logprobs(f.logprobs) if req.logprobs else None,
                "finish_reason": f.finish_reason,
            }
            for f in answers
        ]
        obj = "text_completion"
    return JSONResponse(
        {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
        }
    )


async def _stream(conv: _Request, req: ServeRequest, rid: str, prompt_tokens: int, model: str, created: int):
    chat = req.endpoint == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    finished: dict[int, Finished] = {}
    offsets = [0] * req.n
    try:
        if chat:
            yield chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(req.n)]
            )  # fmt: skip
        while len(finished) < req.n:
            ev = await conv.queue.get()
            if isinstance(ev, Delta):
                if not ev.text and not (req.logprobs and ev.logprobs):
                    continue
                if chat:
                    lp = _chat_logprobs(ev.logprobs) if req.logprobs else None
                    choice = {"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}
                else:
                    lp = _text_logprobs(ev.logprobs, offsets[ev.index]) if req.logprobs else None
                    choice = {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": None}
                offsets[ev.index] += len(ev.text)
                yield chunk([choice])
            elif isinstance(ev, Finished):
                finished[ev.index] = ev
                if chat:
                    choice = {"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}
                else:
                    choice = {"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}
                yield chunk([choice])
            elif isinstance(ev, Refused):
                yield f"data: {json.dumps(_refused(ev.error)[0])}\n\n"
                return
        if req.include_usage:
            completion = sum(f.completion_tokens for f in finished.values())
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion}  # fmt: skip
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        if len(finished) < req.n:  # the client went away (or the stream failed): free the rows
            conv.ticket.cancel()


# ---------------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class RunningServer:
    """A server started by :func:`running_server`."""

    base_url: str  # ends in /v1
    model: str
    port: int
    scheduler: Scheduler
    run_id: int | None  # the recording session's generate run
    recorder: Recorder | None
    catalog_lock: Any  # hold it to read the catalog from this process while the server serves (DuckDB allows one
    # open connection to the file per process at a time; other processes just wait their turn)
    http: Any = None  # the uvicorn server (``http.server_state.tasks``: the requests being handled)


def _start(config: ServeConfig, loaded: LoadedModel | None) -> tuple[Any, Scheduler, Recorder | None, Any]:
    """The listening socket, then the model, the recording run and the started scheduler. The socket is bound first
    (:func:`personavec.serve.listening_socket`): a port in use is one line at once, before the model loads and with
    nothing recorded; it is closed again if what follows fails."""
    from personavec.serve import listening_socket

    sock = listening_socket(config.host, config.port)
    try:
        return (sock, *_start_model(config, loaded))
    except BaseException:
        sock.close()
        raise


def _start_model(config: ServeConfig, loaded: LoadedModel | None) -> tuple[Scheduler, Recorder | None, Any]:
    lock = threading.Lock()
    from personavec.modeling import load_model
    from personavec.workspace import Workspace

    ws = Workspace.resolve(config.workspace).require() if config.workspace is not None else None
    loaded = loaded or load_model(config.model, device=config.device, dtype=config.dtype)
    recorder = None
    if config.record and ws is not None:
        from personavec.store.serving import create_serve_session

        session = create_serve_session(
            ws.catalog(),
            {"serve": {k: v for k, v in config.__dict__.items()}, "model": config.model},
            model=config.model,
            endpoint=f"serve:{config.host}",
        )
        recorder = Recorder(ws, session, config.name, lock)
    scheduler = Scheduler(
        loaded,
        resolver=InterventionResolver(ws, loaded, catalog_lock=lock),
        max_batch=config.max_batch,
        max_new_tokens=config.max_tokens,
        on_finished=recorder,
    )
    scheduler.start()
    return scheduler, recorder, ws


def _http_server(config: ServeConfig, scheduler: Any) -> Any:
    """The uvicorn server over ``scheduler``, to run on the socket of :func:`_start` (``server.run(sockets=...)``)."""
    import uvicorn

    app = build_app(scheduler, config.name, base_name=config.model)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))


@contextmanager
def running_server(config: ServeConfig, *, loaded: LoadedModel | None = None) -> Iterator[RunningServer]:
    """Run the server on a thread while the block runs (``loaded``: a model already loaded, e.g. by a test)."""
    sock, scheduler, recorder, ws = _start(config, loaded)
    port = sock.getsockname()[1]
    thread: threading.Thread | None = None
    try:
        server = _http_server(config, scheduler)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="personavec-serve-http", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ModelError("the HTTP server did not start")
            time.sleep(0.02)
        yield RunningServer(
            base_url=f"http://{config.host}:{port}/v1",
            model=config.name,
            port=port,
            scheduler=scheduler,
            run_id=recorder.session.run_id if recorder else None,
            recorder=recorder,
            catalog_lock=scheduler.resolver.catalog_lock if scheduler.resolver else threading.Lock(),
            http=server,
        )
    finally:
        if thread is not None:
            server.should_exit = True
            thread.join(timeout=10)
        sock.close()
        scheduler.stop()
        if recorder is not None:
            recorder.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(config: ServeConfig, *, on_ready: Any = None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (uvicorn's handlers); ``on_ready(base_url, run_id)`` is called
    once the socket listens."""
    sock, scheduler, recorder, ws = _start(config, None)
    port = sock.getsockname()[1]
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    status = "done"
    try:
        server = _http_server(config, scheduler)
        if on_ready is not None:
            on_ready(f"http://{host}:{port}/v1", recorder.session.run_id if recorder else None)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)  # uvicorn re-raises SIGTERM through it: a clean stop too
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the SIGINT it shut down on: that is how a server is stopped
    except BaseException as exc:
        status = "failed"
        log.error("the server failed: %s", exc)
        raise
    finally:
        sock.close()
        scheduler.stop()
        if recorder is not None:
            recorder.close(status)
