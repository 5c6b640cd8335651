"""Using vectors on a running model: vector names (:mod:`.naming`), interventions as hooks (:mod:`.interventions`:
add, ablate, cap), per-token projections (:mod:`.monitor`) and the report of a coefficient sweep
(:mod:`.sweep_report`)."""
