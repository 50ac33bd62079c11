"""The `jaxgen` command: train | sample | eval | convert | bench | demo.

Each subcommand lives in its own module (`train`: train, eval, convert; `sample`; `other`: bench,
demo) with an `add_parser(sub)` that builds its flags (objective and sampler flags come from
their registries) and a handler.
"""
from __future__ import annotations

import argparse
import sys

from jaxgen.cli import other, sample, train
from jaxgen.errors import JaxgenError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxgen", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    train.add_parsers(sub)
    sample.add_parser(sub)
    other.add_parsers(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit anywhere among the options
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides) or ' '.join(extra)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    try:
        args.fn(args)
    except JaxgenError as e:
        print(f"jaxgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
