"""Sweeps beyond one process: launchers run the points, sweepers choose them.

    python -m forgather.run -m +experiment=NAME lr=1e-3,3e-4 launcher=local launcher.jobs=2
    python -m forgather.run -m +experiment=NAME 'lr=tag(log,interval(1e-4,1e-2))' sweeper=optuna sweeper.n_trials=20
    python -m forgather.run --resume multirun/<timestamp>        (run the points that did not finish)

The design, in the order a sweep flows:
- **Settings** (`settings.py`). `launcher=NAME` / `sweeper=NAME` pick `launcher/NAME.yaml` / `sweeper/NAME.yaml`
  on the template search path (the library's are in conf/); `launcher.KEY=V` and `sweeper.KEY=V` change
  their values, checked like any override against the `_target_` class's signature. An experiment's template
  may choose them too, under a top-level `hydra:` key (`hydra: {launcher: {name: local, jobs: 2}}`), which
  the command line overrides. run.py takes these overrides out before the job's own are parsed.
- **Sweeper** (`basic.py`, `optuna.py`). It turns the job's overrides into points, each a list of override
  texts of single values, and hands them to the launcher: the basic sweeper all at once (the cartesian
  product, with paired axes zipped), Optuna a batch of `n_jobs` trials at a time, told each trial's result
  before asking for the next batch.
- **Launcher** (`local.py`, `submitit.py`, `ray.py`). `launch(jobs)` runs each `Job` (a command line of
  this runner, `python -m forgather.run OVERRIDES`, with FORGATHER_SWEEP_POINT=RUN_DIR in its environment) on an existing
  engine: local subprocesses, SLURM through submitit, Ray tasks; it returns when all have ended. The run
  directories must be on a filesystem the launcher's workers share with this process.
- **A point** (`point.py`) runs as its own process: it writes `outcome.json` in its run directory (status
  ok / failed / pruned, final metrics, the one-line error, start and end times) whatever happens, and its
  output goes to `output.log` beside it. The launcher never parses templates; the process it starts does.
- **Results** (`results.py`). `multirun.yaml` in the sweep directory records the command, so `--resume`
  rebuilds the same points and runs only those whose outcome is not ok (an Optuna study resumes from its
  SQLite file, `optuna.db`, there). At the end: the table, `results.csv`/`results.json` (every point's
  overrides, status and final metrics), and TensorBoard's HParams view in `tb_hparams/`.

Nothing here imports torch, Lightning, Optuna, submitit or Ray at module level.
"""
