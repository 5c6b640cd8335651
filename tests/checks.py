"""Assertions shared by the tests of several modules: a command's one-line error, the runs of a workspace."""

from __future__ import annotations

from personavec.store.runs import list_runs


def one_line_error(res, exit_code: int, *needles: str) -> str:
    """``res`` (a CliRunner result) exited with ``exit_code``, printed no traceback, and its output has ``needles``."""
    assert res.exit_code == exit_code, res.output
    assert "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in res.output, res.output
    return res.output


def runs_of(ws, kind: str | None = None) -> list:
    """The workspace's runs (of ``kind``), as ``personavec runs`` lists them."""
    return list_runs(ws.catalog(), kind)
