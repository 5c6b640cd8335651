"""Frozen records that leave the store (never live ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    id: int
    kind: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    wall_s: float | None
    package_version: str
    host: str | None
    config: dict[str, Any]
    error: str | None


@dataclass(frozen=True)
class RunSummary:
    """One line of `personavec runs`: a run with its main counts."""

    id: int
    kind: str
    status: str
    created_at: datetime
    wall_s: float | None
    items: int
    failed: int
    detail: str


@dataclass(frozen=True)
class PersonaSpec:
    name: str
    system_prompt: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Persona:
    id: int
    name: str
    system_prompt: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Question:
    id: int
    position: int
    text: str


@dataclass(frozen=True)
class PersonaSet:
    id: int
    name: str
    run_id: int
    personas: tuple[Persona, ...] = field(default=())

    def by_name(self) -> dict[str, Persona]:
        return {p.name: p for p in self.personas}


@dataclass(frozen=True)
class QuestionSet:
    id: int
    name: str
    run_id: int
    questions: tuple[Question, ...] = field(default=())
