"""Command-line parsing shared by the CLIs: `-c/--config FILE.yaml` whose keys are the options' dest names,
and one-line errors for bad input."""
import argparse
import os
import sys

import yaml


class UsageError(ValueError):
    """Bad user input; printed as one line and exit status 2."""


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv; values from `-c FILE.yaml` become defaults that the command line still overrides."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(remaining)
    args.config = known.config
    return args


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f'--config {path}: file not found')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f'--config {path}: not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(cfg, dict):
        raise UsageError(f'--config {path}: expected a mapping of option names to values')
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise UsageError(f'--config {path}: unknown key(s) {", ".join(unknown)} '
                         f'(keys are option dest names, e.g. lr, weight_decay, drop_path)')
    return cfg


def run_cli(main, args, argv=None) -> int:
    """Run main(args); user errors become one line on stderr and a non-zero exit instead of a traceback.
    `args` is a parsed Namespace, or a parser factory (get_args_parser) to parse `argv` (with -c) inside."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .device import DeviceError
    from .engine import NonFiniteLossError
    try:
        if callable(args):
            args = parse_with_config(args(), argv)
        result = main(args)
        return result if isinstance(result, int) else 0
    except (UsageError, DataError, DeviceError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2 if isinstance(e, (UsageError, DataError)) else 1
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
