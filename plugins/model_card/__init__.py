"""Built-in plugin ``model_card``: ``OUTPUT_DIR/model/README.md``, a Hugging Face model card,
for every run; ``--push-to-hub REPO`` uploads model, card and report.

Design choices
- The card is written with the model, inside its atomic directory (``sftctl_save``): the
  checkpoint never appears without its card, and the card says that benchmark results are still
  to come (or that ``--no-eval`` skipped them). The loss curve (``loss_curve.png``) is written
  there too.
- After training, ``sftctl_post_train`` (``trylast``: after the ``evals`` plugin wrote
  ``report.json``, whatever the registration order; see ``sftctl.plugins.trackers``) replaces
  the card atomically with the benchmark table base vs SFT, or with the reason there is none.
- ``--push-to-hub`` is checked before training (``sftctl_configure``, rank 0) and uploads after
  the card is final: in ``sftctl_post_train`` when post-training runs, else (``--no-eval``) in
  ``sftctl_after_train``, once the model is complete. Rendering and uploading live in
  ``card.py`` and ``hub.py``; ``sftctl model-card RUN_DIR`` re-renders a card (after a later
  ``sftctl eval``), ``sftctl push-to-hub RUN_DIR REPO [--dry-run]`` uploads (or lists) later.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sftctl import hookimpl

log = logging.getLogger("sftctl")


@hookimpl
def sftctl_configure(config):
    repo = getattr(getattr(config, "train", None), "push_to_hub", None)  # a RunConfig
    if repo and os.environ.get("RANK", "0") == "0":
        from .hub import check_hub_ready

        check_hub_ready(repo)


@hookimpl
def sftctl_save(run, path):
    import yaml

    from .card import CardInputs, render_card, write_loss_curve
    from sftctl.training.atomic import write_text

    path = Path(path)
    summary = json.loads((path / "sftctl_summary.json").read_text(encoding="utf-8"))
    config = yaml.safe_load((path / "sftctl_config.yaml").read_text(encoding="utf-8"))
    history = list(run.history)
    image = write_loss_curve(history, path / "loss_curve.png")
    state = "pending" if run.config.eval.enabled else "disabled"
    inp = CardInputs(summary, config, history, state, run.config.train.push_to_hub)
    write_text(path / "README.md", render_card(inp, has_image=image))


@hookimpl
def sftctl_after_train(run):
    repo = run.config.train.push_to_hub
    if repo and run.is_main and not run.config.eval.enabled:  # no post-training step follows
        from .hub import push

        push(run.output_dir, repo, log=log.info)


@hookimpl(trylast=True)  # after evals wrote report.json
def sftctl_post_train(run_dir, config):
    from .card import update_card

    path = update_card(Path(run_dir), eval_enabled=True)
    log.info("model card: %s", path)
    if config.train.push_to_hub:
        from .hub import push

        push(run_dir, config.train.push_to_hub, log=log.info)


def _cmd_model_card(args) -> int:
    from .card import update_card

    print(update_card(Path(args.run_dir)))
    return 0


def _cmd_push(args) -> int:
    from .hub import collect_upload_files, push

    if args.dry_run:
        for f, p in collect_upload_files(args.run_dir):
            print(f"{p}\t{f}")
        return 0
    push(args.run_dir, args.repo)
    return 0


@hookimpl
def sftctl_add_commands(subparsers):
    p = subparsers.add_parser("model-card", help="(re)write RUN_DIR/model/README.md from the "
                              "run's files (e.g. after `sftctl eval`)")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_model_card)
    p = subparsers.add_parser("push-to-hub", help="upload RUN_DIR's model, card and report to "
                              "a Hugging Face Hub repository")
    p.add_argument("run_dir")
    p.add_argument("repo", help="Hub repository id, e.g. user/my-sft-model")
    p.add_argument("--dry-run", action="store_true",
                   help="list the files (path in the repository, local file) and upload nothing")
    p.set_defaults(func=_cmd_push)
