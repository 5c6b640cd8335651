"""The `personavec` command line: a thin layer over the library, one module per stage."""

from personavec.cli import (
    core,  # noqa: F401  (registers commands)
    extract,  # noqa: F401  (registers extract)
    generate,  # noqa: F401  (registers generate and serve)
    vectors,  # noqa: F401  (registers vector-stage commands)
)
from personavec.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
