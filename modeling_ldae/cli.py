"""Argument parsing shared by the three scripts."""

import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def parse_arguments(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    """Flags, optionally after a YAML / JSON file of arguments as the first one (flags after it override the file).
    A file that does not exist or names unknown arguments raises `ValueError` with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise ValueError(f"Argument file {path} does not exist: pass a YAML/JSON file of {parser.prog} arguments.")
        values = yaml.safe_load(path.read_text()) or {}  # YAML reads JSON too
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:
            raise ValueError(f"{path}: unknown argument(s) {', '.join(unknown)}; see `{parser.prog} --help`.")
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv)
