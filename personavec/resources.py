"""Where the package's bundled files live: ``data/``, ``migrations/`` and ``alembic.ini``.

In a source checkout (editable install) they sit at the repository root; in a wheel they are copied into the
package directory (see ``[tool.hatch.build.targets.wheel.force-include]`` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_path(name: str) -> Path:
    """Path of a bundled resource (``"data"``, ``"migrations"`` or ``"alembic.ini"``)."""
    for base in (_PACKAGE_DIR, _PACKAGE_DIR.parent):
        candidate = base / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"personavec resource {name!r} is missing from the installation ({_PACKAGE_DIR})")
