"""Shared fixtures: fresh workspaces in tmp_path, seeded RNGs, in-process CLI runner."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from personavec import EVAL_QUESTIONS, PERSONAS
from personavec.workspace import Workspace, init_workspace


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh workspace at the head schema with the built-in persona and question sets."""
    return init_workspace(tmp_path / "ws")


@pytest.fixture
def rng() -> np.random.Generator:
    random.seed(0)
    return np.random.default_rng(0)


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture
def seed_cache_file(tmp_path: Path) -> Path:
    """A responses file in the seed's cache format over 5 built-in personas x 3 built-in questions."""
    responses = {
        json.dumps([p, q]): f"{p} answers question {i}: a thoughtful reply."
        for p in list(PERSONAS)[:5]
        for i, q in enumerate(EVAL_QUESTIONS[:3])
    }
    path = tmp_path / "responses_cache.json"
    path.write_text(json.dumps(responses, indent=2))
    return path
