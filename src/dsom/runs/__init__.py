"""Runs: set-up (:mod:`~dsom.runs.setup`), run directories (:mod:`~dsom.runs.rundir`), the student variant registry
(:mod:`~dsom.runs.variants`), the results builder (:mod:`~dsom.runs.results`; the file's typed shape is
:mod:`dsom.schema`, which the CLI and the report read) and the stage orchestration that uses them
(:mod:`~dsom.runs.pipeline`)."""
