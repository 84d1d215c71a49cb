"""Built-in tracker ``mlflow`` (``--report-to mlflow``): an MLflow run, by default in a file
store inside the run directory (no server).

Design choices
- Tracking URI: ``--mlflow-tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the file store
  ``OUTPUT_DIR/mlruns`` (``mlflow ui --backend-store-uri OUTPUT_DIR/mlruns`` shows it). MLflow 3
  refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``; sftctl sets that (unless the user
  set it) only when it picked the file store itself, since the alternative backend (SQLite)
  needs the full ``mlflow`` package and its database dependencies. A URI the user gives is used
  as is.
- ``MlflowClient`` calls with an explicit run id, never mlflow's global active run, so several
  runs in one process (tests) and user code that has its own active run do not mix.
- The run config as parameters (flat dotted keys), scalars as metrics with ``step``, the final
  summary as ``summary/*`` metrics, the benchmark table as the artifact ``benchmarks.json``
  (``log_table``) and ``benchmarks.md`` plus ``benchmark/<task>/<metric>/<model>`` metrics;
  the ``--benchmark-every`` scores as ``benchmark_steps/<task>/<metric>`` metrics at their steps.
- A resumed run reopens the same MLflow run (its id is kept in
  ``OUTPUT_DIR/trackers/mlflow.json``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sftctl import ConfigOption, TrackerSpec, hookimpl
from sftctl.plugins import trackers as base

MAX_PARAM_CHARS = 500  # MLflow rejects longer parameter values on some backends


class MlflowTracker(base.Tracker):
    name = "mlflow"

    def __init__(self, run_dir, config, state, resume_step):
        super().__init__(run_dir, config, state, resume_step)
        uri = config.option("mlflow.tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (Path(run_dir) / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.where = uri
        if state.get("run_id") and state.get("tracking_uri") == uri:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = config.option("mlflow.experiment")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run = self.client.create_run(exp_id, run_name=Path(run_dir).resolve().name,
                                         tags={"sftctl.run_dir": str(Path(run_dir).resolve())})
            self.run_id = run.info.run_id
            state.update(run_id=self.run_id, tracking_uri=uri)
            params = [Param(k, str(v)[:MAX_PARAM_CHARS])
                      for k, v in base.flat_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_scalars(self, step, scalars):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_summary(self, summary):
        self.log_scalars(self.last_step or 0, summary)

    def log_benchmarks(self, step, rows, markdown):
        columns = ("task", "metric", "filter", "base", "sft", "delta")
        table = {c: [r.get(c) for r in rows] for c in columns}
        self.client.log_table(self.run_id, table, "benchmarks.json")
        self.client.log_text(self.run_id, markdown + "\n", "benchmarks.md")
        self.log_scalars(step, base.benchmark_scalars(rows))

    def close(self):
        self.client.set_terminated(self.run_id)


@hookimpl
def sftctl_register_trackers(register):
    register(TrackerSpec("mlflow", "MLflow (file store OUTPUT_DIR/mlruns unless a tracking URI "
                         "is given)", requires=("mlflow",), extra="trackers"))


@hookimpl
def sftctl_add_options(register):
    register(ConfigOption("mlflow.tracking_uri", str, None,
                          "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the file store "
                          "OUTPUT_DIR/mlruns)."))
    register(ConfigOption("mlflow.experiment", str, "sftctl", "MLflow experiment name."))


@hookimpl
def sftctl_train_start(run):
    base.start(run, MlflowTracker)


@hookimpl
def sftctl_step_end(run, metrics):
    base.log_train(run, "mlflow", metrics)


@hookimpl(trylast=True)  # after plugins that add keys to the validation metrics
def sftctl_evaluate(run, metrics):
    base.log_val(run, "mlflow", metrics)


@hookimpl(trylast=True)  # after evals benchmarked this checkpoint (--benchmark-every)
def sftctl_checkpoint_saved(run, step):
    base.log_benchmark_step(run, "mlflow", step)


@hookimpl
def sftctl_after_train(run, summary):
    base.after_train(run, "mlflow", summary)


@hookimpl(trylast=True)  # after evals wrote report.json (see sftctl.plugins.trackers)
def sftctl_post_train(run_dir, config):
    base.post_train(run_dir, config, "mlflow")
