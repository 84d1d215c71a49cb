"""Built-in tracker ``tensorboard`` (``--report-to tensorboard``): TensorBoard event files in
``OUTPUT_DIR/tensorboard`` (``--tensorboard-logdir`` elsewhere); ``tensorboard --logdir
OUTPUT_DIR/tensorboard`` shows them.

Design choices
- Written with ``torch.utils.tensorboard.SummaryWriter`` (torch's own writer; it needs only the
  ``tensorboard`` package, the ``trackers`` extra), read back in the tests with TensorBoard's
  ``EventAccumulator``.
- Scalars under the shared names (``train/loss``, ``val/loss``, ...; see
  ``sftctl.plugins.trackers``), the run config as a text summary ``config`` at the start, the
  final summary as ``summary/*`` scalars, the benchmark table as a Markdown text summary
  ``benchmarks`` (TensorBoard's text tab renders it) plus ``benchmark/<task>/<metric>/<model>``
  scalars at the last step; with ``--benchmark-every`` each benchmarked step's scores as
  ``benchmark_steps/<task>/<metric>`` scalars at that step (the final model's at the last step).
- A resumed run opens the writer with ``purge_step`` = the resumed step, so TensorBoard drops the
  events an interrupted run wrote after that checkpoint instead of drawing them twice.
"""

from __future__ import annotations

from pathlib import Path

from sftctl import ConfigOption, TrackerSpec, hookimpl
from sftctl.plugins import trackers as base


class TensorBoardTracker(base.Tracker):
    name = "tensorboard"

    def __init__(self, run_dir, config, state, resume_step):
        super().__init__(run_dir, config, state, resume_step)
        from torch.utils.tensorboard import SummaryWriter
        import yaml

        logdir = config.option("tensorboard.logdir") or str(Path(run_dir) / "tensorboard")
        self.where = logdir
        self.writer = SummaryWriter(log_dir=logdir, purge_step=resume_step)
        if resume_step is None:
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            self.writer.add_text("config", "```\n" + text + "```", 0)

    def log_scalars(self, step, scalars):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_summary(self, summary):
        self.log_scalars(self.last_step or 0, summary)

    def log_benchmarks(self, step, rows, markdown):
        self.writer.add_text("benchmarks", markdown, step)
        for k, v in base.benchmark_scalars(rows).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


@hookimpl
def sftctl_register_trackers(register):
    register(TrackerSpec("tensorboard", "TensorBoard event files (OUTPUT_DIR/tensorboard)",
                         requires=("tensorboard",), extra="trackers"))


@hookimpl
def sftctl_add_options(register):
    register(ConfigOption("tensorboard.logdir", str, None,
                          "TensorBoard log directory (default: OUTPUT_DIR/tensorboard)."))


@hookimpl
def sftctl_train_start(run):
    base.start(run, TensorBoardTracker)


@hookimpl
def sftctl_step_end(run, metrics):
    base.log_train(run, "tensorboard", metrics)


@hookimpl(trylast=True)  # after plugins that add keys to the validation metrics
def sftctl_evaluate(run, metrics):
    base.log_val(run, "tensorboard", metrics)


@hookimpl(trylast=True)  # after evals benchmarked this checkpoint (--benchmark-every)
def sftctl_checkpoint_saved(run, step):
    base.log_benchmark_step(run, "tensorboard", step)


@hookimpl
def sftctl_after_train(run, summary):
    base.after_train(run, "tensorboard", summary)


@hookimpl(trylast=True)  # after evals wrote report.json (see sftctl.plugins.trackers)
def sftctl_post_train(run_dir, config):
    base.post_train(run_dir, config, "tensorboard")
