"""The built-in personas and evaluation questions (``data/personas.yaml``, ``data/questions.yaml``).

``PERSONAS`` maps persona name to system prompt (the seed's dict), ``EVAL_QUESTIONS`` is the list of 18
questions, ``DEFAULT_PERSONAS`` the names in the ``default`` group (the assistant end of the assistant axis),
``PERSONA_GROUPS`` each persona's groups. The files are read on first use, not at import.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _load() -> dict[str, Any]:
    from personavec.ingest import builtin_files, read_persona_file, read_question_file

    personas_file, questions_file = builtin_files()
    specs = read_persona_file(personas_file)[1]
    return {
        "PERSONAS": {p.name: p.system_prompt for p in specs},
        "PERSONA_GROUPS": {p.name: p.groups for p in specs},
        "DEFAULT_PERSONAS": tuple(p.name for p in specs if "default" in p.groups),
        "EVAL_QUESTIONS": read_question_file(questions_file)[1],
    }


PERSONAS: dict[str, str]
PERSONA_GROUPS: dict[str, tuple[str, ...]]
DEFAULT_PERSONAS: tuple[str, ...]
EVAL_QUESTIONS: list[str]


def __getattr__(name: str) -> Any:
    try:
        return _load()[name]
    except KeyError:
        raise AttributeError(f"module 'personavec.builtin' has no attribute {name!r}") from None
