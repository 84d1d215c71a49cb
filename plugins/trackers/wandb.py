"""Built-in tracker ``wandb`` (``--report-to wandb``): a Weights & Biases run.

Design choices
- ``wandb.init`` with the run config as the W&B config, ``dir=OUTPUT_DIR`` (the run's files go
  to ``OUTPUT_DIR/wandb/``), project ``--wandb-project`` (default: ``WANDB_PROJECT``, else
  ``sftctl``), entity ``--wandb-entity``, name ``--wandb-name`` (default: the run directory's
  name). W&B's own environment variables keep working: ``WANDB_MODE=offline`` writes the run
  without a network (``wandb sync OUTPUT_DIR/wandb/offline-run-*`` uploads it later),
  ``WANDB_MODE=disabled`` turns it off. Without an API key and without offline mode, wandb's own
  login error stops the run before training, named by the plugin manager.
- Scalars are logged with ``step=`` the optimizer step; the final summary goes to the run
  summary; the benchmark table is a ``wandb.Table`` (``benchmarks``) plus
  ``benchmark/<task>/<metric>/<model>`` summary values; the ``--benchmark-every`` scores are
  logged at their steps as ``benchmark_steps/<task>/<metric>`` (a curve per metric).
- A resumed run continues the same W&B run (its id is kept in ``OUTPUT_DIR/trackers/wandb.json``,
  ``resume="allow"``).
- The run is finished explicitly (``finish``), never left to wandb's exit hook, except when
  the process ends early (see ``sftctl.plugins.trackers``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from sftctl import ConfigOption, TrackerSpec, hookimpl
from sftctl.plugins import trackers as base


class WandbTracker(base.Tracker):
    name = "wandb"

    def __init__(self, run_dir, config, state, resume_step):
        super().__init__(run_dir, config, state, resume_step)
        import wandb

        self.wandb = wandb
        if "id" not in state:
            state["id"] = uuid.uuid4().hex[:8]  # W&B's id shape: 8 lowercase hex/alnum
        project = config.option("wandb.project") or os.environ.get("WANDB_PROJECT") or "sftctl"
        self.run = wandb.init(
            project=project, entity=config.option("wandb.entity"),
            name=config.option("wandb.name") or Path(run_dir).resolve().name,
            dir=str(run_dir), id=state["id"], resume="allow",
            config=base.flat_config(config), reinit="create_new")
        run_files = getattr(self.run, "dir", None)  # .../wandb/<offline-run-...>/files
        self.where = str(Path(run_files).parent) if run_files else str(Path(run_dir) / "wandb")

    def log_scalars(self, step, scalars):
        self.run.log(scalars, step=step)

    def log_summary(self, summary):
        for k, v in summary.items():
            self.run.summary[k] = v

    def log_benchmarks(self, step, rows, markdown):
        labels = [lb for lb in ("base", "sft") if any(lb in r for r in rows)]
        columns = ["task", "metric", *labels, "delta"]
        data = [[r.get("task"), r.get("metric"), *[r.get(lb) for lb in labels], r.get("delta")]
                for r in rows]
        self.run.log({"benchmarks": self.wandb.Table(columns=columns, data=data)}, step=step)
        for k, v in base.benchmark_scalars(rows).items():
            self.run.summary[k] = v

    def close(self):
        self.run.finish()


@hookimpl
def sftctl_register_trackers(register):
    register(TrackerSpec("wandb", "Weights & Biases (WANDB_MODE=offline: no network)",
                         requires=("wandb",), extra="trackers"))


@hookimpl
def sftctl_add_options(register):
    register(ConfigOption("wandb.project", str, None,
                          "W&B project (default: WANDB_PROJECT, else sftctl)."))
    register(ConfigOption("wandb.entity", str, None, "W&B entity (team or user)."))
    register(ConfigOption("wandb.name", str, None,
                          "W&B run name (default: the output directory's name)."))


@hookimpl
def sftctl_train_start(run):
    base.start(run, WandbTracker)


@hookimpl
def sftctl_step_end(run, metrics):
    base.log_train(run, "wandb", metrics)


@hookimpl(trylast=True)  # after plugins that add keys to the validation metrics
def sftctl_evaluate(run, metrics):
    base.log_val(run, "wandb", metrics)


@hookimpl(trylast=True)  # after evals benchmarked this checkpoint (--benchmark-every)
def sftctl_checkpoint_saved(run, step):
    base.log_benchmark_step(run, "wandb", step)


@hookimpl
def sftctl_after_train(run, summary):
    base.after_train(run, "wandb", summary)


@hookimpl(trylast=True)  # after evals wrote report.json (see sftctl.plugins.trackers)
def sftctl_post_train(run_dir, config):
    base.post_train(run_dir, config, "wandb")
