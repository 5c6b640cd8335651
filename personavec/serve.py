"""A local OpenAI-compatible server: ``transformers serve`` on the embedded model (or any local/Hub model).

``transformers serve MODEL`` pins the server to MODEL and answers ``/v1/chat/completions`` only for requests whose
``model`` is exactly that string; a local model is named by its path. So that clients can use a short, stable name
(``smollm2-135m-instruct``, whatever port or cache directory), the server runs in a scratch directory holding a
directory of that name whose files link to the real model files. That scratch copy also sets ``do_sample: true`` in
``generation_config.json`` when the model's own file does not say: ``transformers serve`` samples only when the
model's generation config asks for it, and ignores the request's ``temperature`` otherwise.

It reports ``usage`` (prompt/completion tokens), ``finish_reason`` (``stop``/``length``) and ``model`` (the served
name), and accepts any API key. It runs offline (``HF_HUB_OFFLINE=1``) for local models.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from personavec.errors import ConfigError, ModelError, PersonavecError

EMBEDDED_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class LocalServer:
    """A running local server: point ``GenerateConfig(base_url=..., model=...)`` at these two fields."""

    base_url: str
    model: str
    port: int
    pid: int
    log_path: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free one) and listening, for a server to accept on.

    Bound before anything slow or lasting happens (a model load, a recording run), so that a port in use fails at
    once and leaves nothing behind; handed to the server as it is, so that no other process can take the port
    between a check and the bind. A port in use, a port that needs privileges or an address that is not this
    machine's is a one-line :class:`ConfigError` naming ``--port`` / ``--host``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # a port a stopped server left in TIME_WAIT can be taken at once; one another socket listens on cannot
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog from now on, before the server accepts them
    except OSError as exc:
        sock.close()
        where = host or "every address"
        if isinstance(exc, socket.gaierror):
            message = (
                f"cannot listen on --host {host!r}: {exc.strerror or exc} (an IPv4 address or name, e.g. 127.0.0.1)"
            )
        elif exc.errno == errno.EADDRINUSE:
            message = (
                f"port {port} on {where} is in use (another server?): choose another with --port, "
                "or leave --port out for a free one"
            )
        elif exc.errno == errno.EACCES:
            message = f"port {port} on {where} needs privileges: choose one above 1023 with --port, or leave --port out"
        elif exc.errno == errno.EADDRNOTAVAIL:
            message = f"cannot listen on --host {host}: not an address of this machine (127.0.0.1 is this machine only)"
        else:  # a runtime failure (out of file descriptors...): one line, exit 1
            raise PersonavecError(f"cannot listen on {where} port {port}: {exc.strerror or exc}") from None
        raise ConfigError(message) from None  # the --host / --port given: bad input, exit 2
    return sock


def _stage_model(model_dir: Path, served_name: str, scratch: Path) -> None:
    """``scratch/served_name``: links to the model's files, with sampling switched on in its generation config."""
    stage = scratch / served_name
    stage.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "generation_config.json":
            (stage / item.name).symlink_to(item.resolve())
    gen_file = model_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    gen.setdefault("do_sample", True)
    (stage / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _wait_ready(proc: subprocess.Popen, base_url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ModelError(
                f"`transformers serve` exited with code {proc.returncode} before it was ready; "
                f"its log ({log_path}) ends with:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise ModelError(
        f"`transformers serve` did not answer {base_url}/models within {timeout_s:g} s:\n{_tail(log_path)}"
    )


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown can wait on a generation in flight
            proc.kill()
            proc.wait(timeout=10)


def _detach_and_die_with_parent() -> None:
    """In the server's child process, before exec: its own session (a Ctrl-C in the terminal reaches only us, and
    we stop the server ourselves), and on Linux a SIGTERM when its parent dies, even by SIGKILL, so no orphan
    server outlives a killed personavec."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextmanager
def local_server(
    model: str = EMBEDDED_MODEL,
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    device: str = "auto",
    startup_timeout_s: float = 180.0,
    log_level: str = "warning",
) -> Iterator[LocalServer]:
    """Run ``transformers serve`` on ``model`` while the block runs; stop it on exit.

    Args:
        model: ``"smollm2-135m-instruct"`` (the embedded model, converted once to a cached safetensors directory),
            a local model directory, a ``.gguf`` file, or a Hub id (which needs the Hub or its cache).
        port: TCP port; a free one when None.
        host: listen address (loopback by default: the server has no authentication).
        device: ``auto``, ``cpu``, ``cuda:0``...
        startup_timeout_s: how long to wait for ``/v1/models`` to answer.

    Yields:
        a :class:`LocalServer`; requests must name ``server.model``.

    Example::

        with local_server() as server:
            run_generation(ws, GenerateConfig(base_url=server.base_url, model=server.model, max_tokens=64))
    """
    from personavec.modeling import local_model_path

    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"port must be a TCP port 1..65535 (or None for a free one), got {port}")
    if port is not None:  # in use: one line now, not `transformers serve` failing later or another server answering
        listening_socket(host, port).close()
    path = local_model_path(model)
    is_local = path.is_dir()
    if is_local:
        served = model if model == EMBEDDED_MODEL else path.name if path.name else "model"
        if served.lower().endswith(".gguf"):
            served = served[: -len(".gguf")]
    else:
        served = model  # a Hub id is served under its own name
    port = port or free_port(host)
    cmd = [sys.executable, "-m", *_serve_command(served, host=host, port=port, device=device, log_level=log_level)]
    scratch = Path(tempfile.mkdtemp(prefix="personavec-serve-"))
    log_path = scratch / "server.log"
    env = dict(os.environ)
    if is_local:
        _stage_model(path, served, scratch)
        env["HF_HUB_OFFLINE"] = "1"  # everything is on disk: never reach for the network
    log = log_path.open("wb")
    proc = subprocess.Popen(
        cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_detach_and_die_with_parent
    )
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/v1"
    try:
        _wait_ready(proc, base_url, startup_timeout_s, log_path)
        yield LocalServer(base_url=base_url, model=served, port=port, pid=proc.pid, log_path=log_path)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


def transformers_serve_supported() -> bool:
    """Whether the installed transformers has the ``transformers serve`` this backend drives: transformers 5's CLI
    (``transformers.cli``). transformers 4.57 (the core floor) has a different ``serve`` (options, a fixed list of Hub
    models on ``/v1/models``) that personavec does not drive."""
    import importlib.util

    return importlib.util.find_spec("transformers.cli") is not None


def _serve_command(served: str, *, host: str, port: int, device: str, log_level: str) -> list[str]:
    """The ``-m`` module and arguments that start ``transformers serve`` on ``served``; refused, with what to do
    instead, where :func:`transformers_serve_supported` is false."""
    if not transformers_serve_supported():
        import transformers

        raise ConfigError(
            f"the transformers backend runs `transformers serve` as transformers 5 ships it; this environment has "
            f"transformers {transformers.__version__}: use personavec's own server (the default backend) or "
            f"pip install 'transformers[serving]>=5'"
        )
    common = ["--host", host, "--port", str(port), "--device", device, "--log-level", log_level]
    return ["transformers.cli.transformers", "serve", served, *common]


def server_alive(server: LocalServer) -> bool:
    """Whether the server still answers ``/v1/models``."""
    try:
        with urllib.request.urlopen(f"{server.base_url}/models", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False
