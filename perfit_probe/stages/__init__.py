"""The stages: orchestration of the library over a run directory, one module per stage.

Each stage module (``cache``, ``analyze``, ``fit``, ``evaluate``, ``steer``, ``interpret``; and
``tune``, the validation-only search, which the pipeline does not run) exposes
``run(config, run_dir, loaded, *, ...) -> <Stage>StageResult``: the stage's config first, the
run directory second, the loaded model third (None where the stage loads none, or
loads the one its config names), keyword-only extras after (``progress``, ``figures``, ranks
under ``torchrun``). A stage reads what earlier stages wrote, calls the pure library functions,
and writes its files, figures, report and ``metrics.json`` section; the result (a frozen
dataclass) holds the paths, the library's result and the headline metrics.

Shared by the stages: ``rundir`` (``RunDir``, directories written whole), ``fitted`` (reading
a fitted run back), ``distributed`` (``torchrun``), ``markdown`` (tables), the per-stage
reports (``analysis_report``, ``eval_results``, ``interpret_report``), ``claims`` and
``report`` (the run's verdicts and ``report.md``), ``seed_summary`` and ``pipeline`` (every
stage in order, once or once per seed).
"""
