"""``python -m sftctl`` (and ``torchrun -m sftctl``) runs the CLI."""

import sys

from .run.cli import main

sys.exit(main())
