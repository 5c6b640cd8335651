"""Generation: answers from an OpenAI-compatible endpoint (:mod:`.endpoint`, the one client that generation and
judging share) or from the local engine (:mod:`.local`, batched ``model.generate`` that can be steered), landed in
the catalog by the stage :func:`personavec.generation.generate.run_generation`; :mod:`.config` holds what a run asks."""
