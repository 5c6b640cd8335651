"""The built-in personas and evaluation questions (``data/personas.yaml``, ``data/questions.yaml``).

``PERSONAS`` maps persona name to system prompt (the seed's dict), ``EVAL_QUESTIONS`` is the list of 18
questions, ``DEFAULT_PERSONAS`` the names in the ``default`` group (the assistant end of the assistant axis).
"""

from __future__ import annotations

from personavec.ingest import builtin_files, read_persona_file, read_question_file

_personas_file, _questions_file = builtin_files()
_, _persona_specs = read_persona_file(_personas_file)

PERSONAS: dict[str, str] = {p.name: p.system_prompt for p in _persona_specs}
PERSONA_GROUPS: dict[str, tuple[str, ...]] = {p.name: p.groups for p in _persona_specs}
DEFAULT_PERSONAS: tuple[str, ...] = tuple(p.name for p in _persona_specs if "default" in p.groups)
EVAL_QUESTIONS: list[str] = read_question_file(_questions_file)[1]
