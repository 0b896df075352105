"""`anima` command line.

  anima run params/nano.yaml [--only 05_quality_gate ...] [--set section.key=value ...]
  anima params params/nano.yaml [--set ...]     validate and print the resolved parameters
  anima params --describe                       every parameter with its default and meaning
"""
from __future__ import annotations

import argparse
import sys

import yaml

from . import config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="anima", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks with papermill and write the dated HTML report")
    run.add_argument("preset", help="params/<name>.yaml or a preset name (nano, smoke, anima-2b)")
    run.add_argument("--only", action="append", metavar="NOTEBOOK", help="run only this notebook (repeatable)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                     help="override a parameter (repeatable), e.g. --set gate.n_prompts=4")
    show = sub.add_parser("params", help="validate a preset and print the resolved parameters")
    show.add_argument("preset", nargs="?", default="nano")
    show.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides")
    show.add_argument("--describe", action="store_true", help="list every parameter with its default and meaning")
    args = parser.parse_args(argv)
    try:
        if args.command == "params":
            if args.describe:
                print(config.describe())
                return 0
            print(yaml.safe_dump(config.load_config(args.preset, args.overrides).to_dict(), sort_keys=False), end="")
            return 0
        from .report import run_pipeline  # papermill and friends only once the parameters are valid
        return run_pipeline(args.preset, args.overrides, args.only)
    except config.ConfigError as exc:
        print(f"anima: parameter error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
