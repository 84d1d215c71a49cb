"""The base of sftctl's Python-defined lm-eval tasks (loaded by a task YAML's
``class: !function MODULE.Class``): a ``ConfigurableTask`` that drops the ``class`` key lm-eval
hands its constructor with the rest of the YAML. Subclasses override ``fewshot_context`` to build
the prompt from a document (a held-out record, a conversation) and keep everything else —
generation, metrics, filters, sample logs — lm-eval's own.

Importing this module imports lm-eval; task modules import it only when lm-eval loads them.
"""

from __future__ import annotations

from lm_eval.api.task import ConfigurableTask


class PythonTask(ConfigurableTask):
    def __init__(self, config=None, **kwargs):
        config = {k: v for k, v in dict(config or {}).items() if k != "class"}
        super().__init__(config=config, **kwargs)
