"""``sftctl config import FILE``: a TRL/Axolotl YAML converted into sftctl's YAML.

Design choices
- The same table as ``--config`` files use (``aliases.translate``), run non-strict: what maps is
  written in sftctl's sections, what does not is listed on stderr and as comments at the top of
  the output, so nothing is dropped silently. Conflicts (an alias and its sftctl key, two
  aliases of one key) stay errors.
- The result is validated like a real config (``build_config`` with the loaded plugins'
  options), so an imported file that ``sftctl train --config`` would refuse is reported here.
  Keys neither sftctl nor the alias table knows are reported as not mapped too.
- Output on stdout unless ``-o FILE`` (written atomically); exit 0 when everything mapped, 1
  when something was left out (the file is still written: the user decides).
"""

from __future__ import annotations

import sys

import yaml

from . import config as C
from .aliases import translate


def build_config_parser(sub) -> None:
    p = sub.add_parser("config", help="work with config files (import a TRL/Axolotl YAML)")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    pi = csub.add_parser(
        "import", help="convert a TRL/Axolotl YAML into sftctl's YAML",
        description="Convert a TRL (SFTConfig/TrainingArguments) or Axolotl YAML file into an "
                    "sftctl config (sections model, data, optim, train, eval, options). Keys "
                    "that cannot be mapped are listed on stderr and as comments.")
    pi.add_argument("file")
    pi.add_argument("-o", "--output", metavar="RUN.YAML", help="write here instead of stdout")
    pi.set_defaults(func=cmd_config_import)


def cmd_config_import(args, pm, options) -> int:
    import dataclasses

    data = C.load_yaml(args.file)
    out, mapped, dropped = translate(data, str(args.file), strict=False)
    top = {f.name for f in dataclasses.fields(C.RunConfig)}
    from .aliases import ALIASES, NO_EQUIVALENT, _SPECIAL

    for key in data:
        if key not in top and key not in ALIASES and key not in NO_EQUIVALENT \
                and key not in _SPECIAL:
            dropped.append((key, "unknown to sftctl and to the TRL/Axolotl table"))
    layers = [("defaults", {"train": {"output_dir": "runs/x"}}), (str(args.file), out)]
    C.build_config(layers, options)  # the result must be a valid sftctl config
    header = [f"# sftctl config imported from {args.file}"]
    header += [f"#   {a} -> {k}" for a, k in mapped]
    if dropped:
        header.append("# not mapped (no sftctl equivalent; review before training):")
        header += [f"#   {k}: {why}" for k, why in dropped]
    text = "\n".join(header) + "\n" + yaml.safe_dump(out, sort_keys=False)
    if args.output:
        from ..training.atomic import write_text

        write_text(args.output, text)
    else:
        sys.stdout.write(text)
    for k, why in dropped:
        print(f"sftctl: not mapped: {k}: {why}", file=sys.stderr)
    return 1 if dropped else 0
