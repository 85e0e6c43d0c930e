"""The shared flag value parsers: what each accepts, and the message naming what is allowed when it refuses."""

from __future__ import annotations

import argparse
import os

import pytest
from text_generation_server.utils import argtypes


def refusal(parse, value: str) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(value)
    return str(err.value)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", " yes ", "on"])
@pytest.mark.parametrize("parse", [argtypes.parse_bool, argtypes.parse_bool_or_empty])
def test_true_spellings(parse, value):
    assert parse(value) is True


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "off"])
@pytest.mark.parametrize("parse", [argtypes.parse_bool, argtypes.parse_bool_or_empty])
def test_false_spellings(parse, value):
    assert parse(value) is False


@pytest.mark.parametrize(
    "parse, empty",
    [(argtypes.parse_bool, None), (argtypes.parse_bool_or_empty, False)],
)
def test_empty_is_false_only_where_allowed(parse, empty):
    if empty is None:
        assert refusal(parse, "") == "expected true or false (or 1/0), got ''"
    else:
        assert parse("") is empty and parse("  ") is empty


@pytest.mark.parametrize("parse", [argtypes.parse_bool, argtypes.parse_bool_or_empty])
def test_other_words_are_not_booleans(parse):
    assert refusal(parse, "maybe") == "expected true or false (or 1/0), got 'maybe'"


@pytest.mark.parametrize(
    "parse, good, bad, message",
    [
        (argtypes.positive_int, ["1", "4096"], ["0", "-3", "x", "1.5"], "expected an integer >= 1, got {!r}"),
        (argtypes.non_negative_int, ["0", "7"], ["-1", "", "two"], "expected an integer >= 0, got {!r}"),
        (argtypes.int_at_least(-1), ["-1", "5"], ["-2"], "expected an integer >= -1, got {!r}"),
        (argtypes.integer, ["-5", "0", "12"], ["1e3", "abc", ""], "expected an integer, got {!r}"),
    ],
)
def test_integers(parse, good, bad, message):
    for value in good:
        assert parse(value) == int(value)
    for value in bad:
        assert refusal(parse, value) == message.format(value)


@pytest.mark.parametrize(
    "parse, lowest",
    [(argtypes.port, 1), (argtypes.port_or_zero, 0)],
)
def test_ports(parse, lowest):
    assert parse(str(lowest)) == lowest
    assert parse("65535") == 65535
    for value in (str(lowest - 1), "65536", "70000", "http"):
        assert refusal(parse, value) == f"expected a port number {lowest}-65535, got {value!r}"


def test_non_negative_float():
    assert argtypes.non_negative_float("0") == 0.0
    assert argtypes.non_negative_float("2.5") == 2.5
    for value in ("-0.1", "nan", "inf", "soon"):
        assert refusal(argtypes.non_negative_float, value) == f"expected a number >= 0, got {value!r}"


def test_number():
    assert argtypes.number("-1.5") == -1.5
    for value in ("nan", "-inf", "x"):
        assert refusal(argtypes.number, value) == f"expected a number, got {value!r}"


def test_choice_is_exact():
    parse = argtypes.choice(("gptq", "bitsandbytes"))
    assert parse("gptq") == "gptq"
    assert refusal(parse, "GPTQ") == "expected one of gptq, bitsandbytes; got 'GPTQ'"


def test_non_empty():
    assert argtypes.non_empty("m") == "m"
    assert refusal(argtypes.non_empty, "  ") == "expected a non-empty value"


def test_readable_file(tmp_path):
    present = tmp_path / "cert.pem"
    present.write_text("x")
    assert argtypes.readable_file(str(present)) == str(present)
    assert refusal(argtypes.readable_file, str(tmp_path / "missing.pem")) == f"{tmp_path / 'missing.pem'}: no such file"
    assert refusal(argtypes.readable_file, str(tmp_path)) == f"{tmp_path}: is a directory, expected a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_refused(tmp_path):
    locked = tmp_path / "key.pem"
    locked.write_text("x")
    locked.chmod(0)
    assert "cannot be read (Permission denied)" in refusal(argtypes.readable_file, str(locked))


def test_argparse_prints_the_message_as_is(capsys):
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--port", type=argtypes.port)
    with pytest.raises(SystemExit):
        parser.parse_args(["--port", "70000"])
    assert "argument --port: expected a port number 1-65535, got '70000'" in capsys.readouterr().err
