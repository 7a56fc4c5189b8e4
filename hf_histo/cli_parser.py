"""The `hf-histo` argument parser: DATA given once (positional or --data), two-line usage errors with a hint."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from typing import NoReturn

DATA_HELP_ALIAS = "DATA as an option: one of DATA and --data is required"


def str_to_bool(value: str) -> bool:
    """`true`/`false` (and 1/0, yes/no) for flags that take an optional value, as the recipes' booleans do."""
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` for `hf-histo` and its subcommands.

    A usage error prints two lines, the error and a hint (a close option or subcommand name, found with difflib,
    and the command's `--help`), and exits with status 2. A subcommand that reads data takes it as the positional
    `DATA` or as `--data DATA` (exactly one); `parse_args` returns it as `data` either way.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, CommandParser] = {}
        self.data_help: str | None = None

    def add_data_argument(self, help: str) -> None:
        """Add DATA, positional, and its alias `--data DATA`."""
        self.data_help = help
        self.add_argument("data", nargs="?", metavar="DATA", help=help)
        self.add_argument("--data", dest="data_option", metavar="DATA", default=None, help=DATA_HELP_ALIAS)

    def add_commands(self, **kwargs) -> argparse._SubParsersAction:
        """`add_subparsers`, remembering the subcommands so their errors carry their own name and options."""
        sub = self.add_subparsers(**kwargs)
        self.commands = sub.choices
        return sub

    def set_usage(self) -> None:
        """One short usage line: `PROG DATA --required OPTION ... [options]` (the options are under --help)."""
        words = ["%(prog)s"]
        if self.data_help is not None:
            words.append("DATA")
        for action in self._actions:
            if action.required and action.option_strings:
                words.append(f"{action.option_strings[-1]} {action.metavar or action.dest.upper()}")
        self.usage = " ".join([*words, "[options]"])

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """Parse the command line; unknown arguments and a missing or doubled DATA are the subcommand's errors."""
        namespace, extras = self.parse_known_args(args, namespace)
        parser = self.commands.get(getattr(namespace, "command", None), self)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        if hasattr(namespace, "data_option"):
            option = namespace.data_option
            del namespace.data_option
            if namespace.data is not None and option is not None:
                parser.error(f"DATA given twice ({namespace.data} and --data {option}): give it once")
            if namespace.data is None and option is None:
                parser.error("the following arguments are required: DATA (or --data DATA)")
            if namespace.data is None:
                namespace.data = option
        return namespace

    def error(self, message: str) -> NoReturn:
        """Print the error and a one-line hint (not the usage) and exit with status 2."""
        close = self._close_match(message)
        hint = f"did you mean {close}? " if close else ""
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: {hint}see '{self.prog} --help'\n")

    def _close_match(self, message: str) -> str | None:
        """The option or choice closest to the mistyped word of an argparse error, if one is close."""
        choice = re.search(r"invalid choice: '([^']*)'", message)
        if choice:
            word = choice.group(1)
            candidates = [str(c) for action in self._actions if action.choices for c in action.choices]
        elif message.startswith("unrecognized arguments: "):
            options = [w for w in message.split()[2:] if w.startswith("-")]
            if not options:
                return None
            word = options[0].split("=", 1)[0]
            candidates = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        else:
            return None
        close = difflib.get_close_matches(word, candidates, n=1)
        return close[0] if close else None
