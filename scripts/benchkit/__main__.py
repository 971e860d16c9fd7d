"""Dispatch ``scripts/bench <subcommand>`` to the module of that name (see __init__.py)."""
import argparse
import importlib
import sys

from benchkit import SUBCOMMANDS


def _unavailable(name: str):
    def run(args) -> int:
        print(f"bench: '{name}' is not available in this checkout "
              f"(scripts/benchkit/{name}.py is missing)", file=sys.stderr)
        return 2
    return run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"benchkit.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchkit.{name}":
                raise
            subparsers.add_parser(name, help="not available").set_defaults(
                run=_unavailable(name))
            continue
        module.register(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
