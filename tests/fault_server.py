"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat API and misbehaves on purpose.

A *script* decides what each request gets: ``script(attempt, n, body) -> action`` where ``attempt`` counts the
requests for the same conversation (0 for the first), ``n`` counts all requests (0-based) and ``body`` is the JSON
request. Actions: ``"ok"``, ``("status", code, headers, body)``, ``("hang", seconds)`` (then answers, too late),
``"drop"`` (closes the connection without a response), ``"html"``, ``"nochoices"``, ``("slow", seconds)`` (answers
after a delay), ``("echo", code)`` (an error that echoes the request's ``Authorization`` header, then all its
headers, as some proxies do), ``("reply", text, logprobs)`` (a 200 answer with this text and, unless None, this
``choices[0].logprobs`` object: see :func:`first_token_logprobs`). ``server.headers`` keeps every request's headers
(lower-case names) and ``server.bodies`` every request's JSON body.

Connections are kept alive (HTTP/1.1), as real servers (vLLM, SGLang, TGI, transformers serve) keep them.

Retryable error statuses (408, 409, 429, 5xx) carry ``retry-after-ms: <retry_after_ms>`` (default 10) unless the
script sets its own ``Retry-After``/``retry-after-ms``: the ``openai`` client then retries after 10 ms instead of its
exponential backoff (0.5 s, 1 s, 2 s...), which only slowed the tests down. ``FaultServer(retry_after_ms=None)``
sends no such header (the client's own backoff applies, as it does after a dropped connection or a timeout).
``FaultServer(tls=(certificate, key))`` serves HTTPS (:func:`self_signed_certificate` makes a pair).
"""

from __future__ import annotations

import json
import math
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Script = Callable[[int, int, dict], Any]


def always_ok(attempt: int, n: int, body: dict) -> Any:
    return "ok"


def first_token_logprobs(top: dict[str, float], token: str | None = None) -> dict:
    """A ``choices[0].logprobs`` object as OpenAI sends it: the first generated token (default: the likeliest of
    ``top``) with its top alternatives ``{token: probability}``."""
    token = token if token is not None else max(top, key=top.__getitem__)
    alternatives = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in top.items()]
    chosen = {"token": token, "logprob": math.log(top.get(token, 1e-9)), "bytes": list(token.encode())}
    return {"content": [chosen | {"top_logprobs": alternatives}], "refusal": None}


def answer_for(body: dict) -> str:
    """The deterministic answer text the server gives to a request."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    return f"[{system[:20]}] answer to: {user[:40]}"


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up (a cancelled request) is fine
            super().handle_error(request, client_address)


class FaultServer:
    """Start with ``with FaultServer(script) as server:``; ``server.base_url`` ends in ``/v1``."""

    def __init__(
        self,
        script: Script = always_ok,
        model: str = "fault-model",
        retry_after_ms: int | None = 10,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.script = script
        self.model = model
        self.retry_after_ms = retry_after_ms
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.requests = 0
        self.answered = 0  # complete 200 answers written
        self.headers: list[dict[str, str]] = []
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection serves many requests

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                self._json(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                key = json.dumps(body.get("messages"), sort_keys=True)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer.lock:
                    outer.headers.append(headers)
                    outer.bodies.append(body)
                    attempt = outer.attempts[key]
                    outer.attempts[key] += 1
                    n = outer.requests
                    outer.requests += 1
                action = outer.script(attempt, n, body)
                kind = action if isinstance(action, str) else action[0]
                if kind == "ok":
                    self._answer(body)
                elif kind == "slow":
                    time.sleep(action[1])
                    self._answer(body)
                elif kind == "hang":
                    time.sleep(action[1])
                    try:
                        self._answer(body)
                    except OSError:
                        pass  # the client gave up long ago
                elif kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif kind == "html":
                    self._raw(200, "text/html", b"<html><body>Welcome to nginx!</body></html>")
                elif kind == "nochoices":
                    self._json(200, {"object": "something.else", "data": []})
                elif kind == "echo":
                    auth = headers.get("authorization")
                    self._json(
                        action[1], {"error": {"message": f"refused Authorization: {auth}; {json.dumps(headers)}"}}
                    )
                elif kind == "reply":
                    self._answer(body, action[1], action[2])
                elif kind == "status":
                    _, code, headers, payload = action
                    self._json(code, payload, headers)
                else:
                    raise ValueError(f"unknown action {action!r}")

            def _answer(self, body: dict, text: str | None = None, logprobs: dict | None = None) -> None:
                text = answer_for(body) if text is None else text
                words = text.split()
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                if logprobs is not None:
                    choice["logprobs"] = logprobs
                self._json(
                    200,
                    {
                        "id": "chatcmpl-fault",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": outer.model,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": 10,
                            "completion_tokens": len(words),
                            "total_tokens": 10 + len(words),
                        },
                    },
                )
                with outer.lock:
                    outer.answered += 1

            def _json(self, code: int, payload: Any, headers: dict | None = None) -> None:
                self._raw(code, "application/json", json.dumps(payload).encode(), headers)

            def _raw(self, code: int, ctype: str, data: bytes, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                headers = dict(headers or {})
                retryable = code in (408, 409, 429) or code >= 500
                told = any(k.lower() in ("retry-after", "retry-after-ms") for k in headers)
                if retryable and not told and outer.retry_after_ms is not None:
                    headers["retry-after-ms"] = outer.retry_after_ms
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(data)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # a hanging handler must not block shutdown
        self.port = self._server.server_address[1]
        if tls is not None:  # (certificate, key): HTTPS, the handshake made as each connection is accepted
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/v1"
        # shutdown() waits for serve_forever to look at its flag, which it does once per poll_interval (0.5 s by
        # default): ~40 servers a run each took up to 0.5 s to stop (18 s in all).
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def sigkill_once_answered(cmd: list[str], server: FaultServer, answered: int = 4) -> None:
    """Run ``cmd`` (a CLI stage asking ``server``), SIGKILL it once the server has answered ``answered`` requests,
    and check it was still running then and died of the signal."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while server.answered < answered and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key, and that key (PEM files in ``directory``), made by the
    ``openssl`` command."""
    import subprocess

    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key
