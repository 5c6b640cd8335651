"""The Typer application and what every command shares: the workspace option, output, and error handling."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup, TyperOption

from personavec.errors import PersonavecError, RunInterrupted, Terminated
from personavec.workspace import Workspace


def _untyped_flags(params: list[Any]) -> list[Any]:
    # Typer's Rich help prints every option's type, flags included (`--overwrite <bool>`), though a flag takes no
    # value (`--overwrite true` is refused). An empty metavar hides it; only flags are touched.
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class CliTyper(typer.Typer):
    """A Typer whose commands and groups show flags without a value type in ``--help``; use it for sub-apps."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", _Group)
        kwargs.setdefault("pretty_exceptions_enable", False)
        kwargs.setdefault("add_completion", False)
        super().__init__(**kwargs)

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(name, cls=cls or _Command, **kwargs)


app = CliTyper(
    name="personavec",
    help="Extract persona vectors from transformer models; every step lands in a DuckDB catalog.",
    no_args_is_help=True,
)


def _version(value: bool) -> None:
    if value:
        from personavec import __version__

        console.print(f"personavec {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Extract persona vectors from transformer models; every step lands in a DuckDB catalog."""


#: Columns of output that is not a terminal (a pipe, a file, CI logs): wide, so tables are not wrapped at Rich's 80.
PIPE_WIDTH = 1000


class _Console(Console):
    """A Rich console that wraps at the terminal's width on a terminal (or at $COLUMNS), and at :data:`PIPE_WIDTH`
    elsewhere: ``personavec runs | grep`` and logs keep one line per row."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._width = kwargs.get("width")  # $COLUMNS is read when a size is asked, not once at import

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal:
            columns = os.environ.get("COLUMNS", "")
            return ConsoleDimensions(int(columns) if columns.isdigit() else PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = _Console()
err_console = _Console(stderr=True)

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="Workspace directory (default: $PERSONAVEC_WORKSPACE, else ./personavec-workspace)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def workspace(path: Path | None) -> Workspace:
    return Workspace.resolve(path)


@functools.cache
def _command_pattern() -> re.Pattern[str]:
    """``personavec COMMAND`` for each command of this app (``personavec GROUP SUBCOMMAND`` for a group's), where a
    ``--workspace`` option does not follow already."""

    def name(info: Any) -> str:  # as Typer names a command (from its function where not given)
        return str(info.name or typer.main.get_command_name(info.callback.__name__))

    names = [name(info) for info in app.registered_commands]
    for group in app.registered_groups:
        subs = group.typer_instance.registered_commands if group.typer_instance is not None else []
        names += [f"{group.name} {name(info)}" for info in subs]
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"\bpersonavec (?:{alternatives})(?![\w-])(?! (?:--workspace|-w)\b)")


def on_workspace(text: str, ws: Path | None) -> str:
    """``text`` with every ``personavec COMMAND`` it names given ``--workspace`` (the workspace's absolute path)
    when the command that prints it was given ``-w``: a resume command or a query hint copied from the output then
    reaches the same catalog, not ``./personavec-workspace``. Unchanged when ``ws`` is None (the default or
    ``$PERSONAVEC_WORKSPACE``, which the hint reaches as it is)."""
    if ws is None:
        return text
    flag = f"--workspace {shlex.quote(str(Path(ws).expanduser().resolve()))}"
    return _command_pattern().sub(lambda m: f"{m.group(0)} {flag}", text)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (for scripts)."""
    sys.stdout.write(json.dumps(_jsonable(obj), default=str) + "\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    # at least as wide as its title, so that the title (a run's label, a vector name) is not wrapped mid-word
    table = Table(title=title, show_lines=False, box=box.SIMPLE_HEAD, min_width=len(title) + 2 if title else None)
    for col in columns:
        table.add_column(str(col), overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


#: Seconds between progress lines when stderr is not a terminal (CI logs, nohup, pipes).
LOG_EVERY_S = 10.0


@contextmanager
def stage_progress(label: str, *, quiet: bool = False, every_s: float = LOG_EVERY_S) -> Iterator[Callable[..., None]]:
    """Progress of a long stage, as ``update(done, total, detail="")``: a Rich bar on a terminal; elsewhere one plain
    line on stderr at the start, every ``every_s`` seconds (also while nothing finishes: a step that takes minutes on
    a busy machine still shows it is alive) and at the end (unless that line was just printed), so logs of long runs
    show where they are."""
    if quiet:
        yield lambda done, total, detail="": None
        return
    if err_console.is_terminal:
        with Progress(
            TextColumn(f"[bold]{escape(label)}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        ) as bar:
            task = bar.add_task(label, total=None, detail="")
            yield lambda done, total, detail="": bar.update(task, completed=done, total=total, detail=detail)
        return
    start = time.monotonic()
    state: dict[str, Any] = {"logged": start - every_s, "last": None, "printed": None}
    lock = threading.Lock()
    stop = threading.Event()

    def line() -> None:
        with lock:
            state["logged"] = time.monotonic()
            if state["last"] is None:
                text = f"{label}: starting"
            else:
                done, total, detail = state["last"]
                text = f"{label}: {done}/{total}" + (f" {detail}" if detail else "")
            state["printed"] = state["last"]
            sys.stderr.write(f"{text} [{time.monotonic() - start:.0f}s]\n")
            sys.stderr.flush()

    def update(done: int, total: int | None, detail: str = "") -> None:
        state["last"] = (done, total if total is not None else "?", detail)
        if time.monotonic() - state["logged"] >= every_s:
            line()

    def heartbeat() -> None:
        while not stop.wait(min(1.0, every_s)):
            if time.monotonic() - state["logged"] >= every_s:
                line()

    line()
    ticker = threading.Thread(target=heartbeat, name=f"personavec-{label}-progress", daemon=True)
    ticker.start()
    try:
        yield update
    finally:
        stop.set()
        ticker.join()
        if state["last"] is not None and state["last"] != state["printed"]:
            line()


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: a PersonavecError becomes one red line on stderr and its exit code, Ctrl-C exits 130, and the
    catalogs the command opened are closed (releasing DuckDB's file lock) however it ends.

    Use under ``@app.command()``; Typer reads the wrapped function's signature."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from personavec.store.engine import close_catalog

        ws = kwargs.get("ws")  # the command's --workspace: the commands its messages name run there too
        try:
            return fn(*args, **kwargs)
        except PersonavecError as exc:
            # escaped: a message quoting "[...]" (a list, a JSON key) must print as is, not as Rich markup
            message = on_workspace(str(exc), ws)
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if exc.filename is None:
                raise
            # a path the file system refuses (a 300-character name, a read-only or full disk): one line, not a
            # traceback; a name too long is bad input (2), the rest runtime failures (1)
            name = str(exc.filename)
            shown = name if len(name) <= 120 else f"{name[:60]}...{name[-40:]} ({len(name)} characters)"
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENAMETOOLONG:
                reason += " (the file system allows 255 bytes per name): choose a shorter name"
            err_console.print(f"[bold red]error:[/] {escape(shown)}: {escape(reason)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if exc.errno == errno.ENAMETOOLONG else 1) from None
        except KeyboardInterrupt as exc:
            code = 143 if isinstance(exc, Terminated) or isinstance(exc.__context__, Terminated) else 130
            if isinstance(exc, RunInterrupted):
                resume = on_workspace(exc.resume_command, ws)
                err_console.print(f"[yellow]interrupted[/]: resume with: {escape(resume)}", soft_wrap=True)
            elif kwargs.get("resume") is not None:  # generate, extract, judge, evaluate: named as their function
                # stopped before the stage took the run over (a model loading): the same resume continues it
                resume = on_workspace(f"personavec {fn.__name__} --resume {kwargs['resume']}", ws)
                err_console.print(f"[yellow]interrupted[/]: resume with: {escape(resume)}", soft_wrap=True)
            else:
                err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code) from None
        finally:
            close_catalog()

    return wrapper
