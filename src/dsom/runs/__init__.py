"""Runs: set-up (:mod:`~dsom.runs.setup`), run directories (:mod:`~dsom.runs.rundir`), the student variant registry
(:mod:`~dsom.runs.variants`), the results builder and its schema (:mod:`~dsom.runs.results`,
:mod:`~dsom.runs.schema`) and the stage orchestration that uses them (:mod:`~dsom.runs.pipeline`)."""
