"""Command-line parsing shared by ``train.py`` (and its ``export`` and ``bench`` subcommands) and the shard writer:
a refused command line is one line and exit code 2, naming the flag and what it allows."""
from __future__ import annotations

import argparse
from typing import Callable


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusal of the command line is one line (and exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def integer_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``, refused in argparse's words, which name the flag."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use an integer >= {low}")
        return value

    return integer
