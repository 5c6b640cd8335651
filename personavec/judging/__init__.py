"""Judging answers with an LLM judge: rubrics and traits (:mod:`.rubrics`), reading a score from an answer and the
filters vectors select with (:mod:`.scores`), the judge stage (:mod:`.judge`), and trait vectors (:mod:`.traits`)."""
