"""Value parsers for command-line flags and the environment variables behind them.

The launcher, the router and the quantizer take the same kinds of values
(booleans, counts, ports, durations, one-of choices) from flags and from
environment variables. Each parser here takes the raw string and returns the
value, or raises ``argparse.ArgumentTypeError`` whose message says what is
allowed and repeats what was given ("expected an integer >= 1, got '0'"), so
argparse prints it as is and the environment readers can prefix the
variable's name.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence

_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off"))


def parse_bool(value: str) -> bool:
    """true/false/1/0 (also yes/no/on/off), case-insensitive, surrounding blanks ignored."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (or 1/0), got {value!r}")


def parse_bool_or_empty(value: str) -> bool:
    """As :func:`parse_bool`, and an empty value is False (``FLAG=`` in an env file switches it off)."""
    if not value.strip():
        return False
    return parse_bool(value)


def integer(value: str) -> int:
    """Any integer in decimal notation."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A parser for integers >= ``minimum``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return number

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def port_number(minimum: int = 1) -> Callable[[str], int]:
    """A parser for TCP ports ``minimum``-65535; ``minimum=0`` admits 0, "any free port"."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not minimum <= number <= 65535:
            raise argparse.ArgumentTypeError(f"expected a port number {minimum}-65535, got {value!r}")
        return number

    parse.__name__ = "port"
    return parse


port = port_number(1)
port_or_zero = port_number(0)


def number(value: str) -> float:
    """Any finite decimal number."""
    try:
        result = float(value)
    except ValueError:
        result = math.nan
    if not math.isfinite(result):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    return result


def non_negative_float(value: str) -> float:
    """A finite number >= 0 (seconds, ratios)."""
    try:
        result = float(value)
    except ValueError:
        result = math.nan
    if not math.isfinite(result) or result < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return result


def positive_float(value: str) -> float:
    """A finite number > 0 (timeouts that must not be zero)."""
    try:
        result = float(value)
    except ValueError:
        result = math.nan
    if not math.isfinite(result) or result <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return result


def fraction(value: str) -> float:
    """A number in (0, 1] (a share of a device's memory)."""
    try:
        result = float(value)
    except ValueError:
        result = math.nan
    if not 0 < result <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value!r}")
    return result


def choice(choices: Sequence[str]) -> Callable[[str], str]:
    """A parser accepting exactly one of ``choices`` (case-sensitive, as the values are written)."""
    allowed = tuple(choices)

    def parse(value: str) -> str:
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(allowed)}; got {value!r}")
        return value

    parse.__name__ = "choice"
    return parse


def non_empty(value: str) -> str:
    """Any value with a non-blank character (names, paths, addresses)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return value


def readable_file(value: str) -> str:
    """A path to a regular file this process can read (certificates, keys); returned as given."""
    path = non_empty(value)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path}: is a directory, expected a file")
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{path}: no such file") from None
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{path}: cannot be read ({err.strerror})") from None
    return path
