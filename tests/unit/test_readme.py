"""README.md against the code: the configuration table is `text-generation-launcher --help`, the metrics
list is what /metrics serves, the sections a user expects exist, and the commands shown use real flags."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from readme_text import README, code_blocks, code_names, sections, table_rows
from text_generation_launcher.args import _FLAGS, ROUTER_LIMIT_FLAGS, build_parser, parse_args
from text_generation_router.config import RouterArgs
from text_generation_router.metrics import RouterMetrics

LAUNCHER = Path(sys.executable).parent / "text-generation-launcher"


@dataclass(frozen=True)
class FlagDoc:
    names: tuple[str, ...]
    env: tuple[str, ...]
    default: str


def launcher_help() -> str:
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run([str(LAUNCHER), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def flags_from_help(text: str) -> dict[str, FlagDoc]:
    """Each option entry of --help: its names (from the invocation), [env: ...] and (default: ...)."""
    options = text.split("options:\n", 1)[1]
    docs: dict[str, FlagDoc] = {}
    for entry in re.split(r"\n(?=  -)", options):
        invocation = re.split(r"\s{2,}", entry.splitlines()[0].strip(), maxsplit=1)[0]
        names = tuple(token.rstrip(",") for token in invocation.split() if token.startswith("--"))
        if names == ("--help",):
            continue
        flat = " ".join(entry.split())
        env = re.search(r"\[env: ([^\]]+)\]", flat)
        default = re.search(r"\(default: (.*)\)$", flat)
        assert env and default, f"--help entry without [env: ...] or (default: ...): {flat}"
        docs[names[0]] = FlagDoc(names, tuple(env.group(1).split(", ")), default.group(1))
    return docs


def flags_from_readme() -> dict[str, FlagDoc]:
    docs: dict[str, FlagDoc] = {}
    for flag, env, default, *_ in table_rows(sections()["Configuration"]):
        names = tuple(code_names(flag))
        docs[names[0]] = FlagDoc(names, tuple(code_names(env)), default.replace("`", ""))
    return docs


def shown(value: object) -> str:
    """A default as --help and the README write it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@pytest.fixture(scope="module")
def help_flags() -> dict[str, FlagDoc]:
    return flags_from_help(launcher_help())


# ---- configuration table ---------------------------------------------------------------------------------


def test_configuration_table_lists_the_flags_env_vars_and_defaults_of_launcher_help(help_flags):
    readme = flags_from_readme()
    missing, extra = sorted(set(help_flags) - set(readme)), sorted(set(readme) - set(help_flags))
    assert not missing and not extra, f"README table lacks {missing}; lists flags --help does not: {extra}"
    for name, doc in help_flags.items():
        assert readme[name] == doc, f"README row of {name} differs from --help"


def test_help_parser_reads_every_flag_of_the_launcher(help_flags):
    """The --help reader itself: it finds every flag the launcher defines, aliases included."""
    assert {d.names for d in help_flags.values()} == {f.names for f in _FLAGS}


def test_shown_defaults_are_the_parsers_defaults(help_flags):
    parser = build_parser(env={})
    parsed = parse_args([], env={}, cuda_device_count=lambda: 0)
    for doc in help_flags.values():
        dest = doc.names[0].lstrip("-").replace("-", "_")
        default = parser.get_default(dest)
        if default is not None:
            assert doc.default == shown(default) == shown(getattr(parsed, dest)), doc.names[0]


def test_router_limit_defaults_shown_are_the_routers(help_flags):
    router_defaults = {f.name: f.default for f in fields(RouterArgs)}
    checked = 0
    for dest, router_flag in ROUTER_LIMIT_FLAGS.items():
        doc = help_flags[router_flag]
        if router_defaults[dest] is not None:
            assert doc.default == shown(router_defaults[dest]), router_flag
            checked += 1
        else:
            assert not re.fullmatch(r"[\d.]+", doc.default), f"{router_flag}: the router has no fixed default"
    assert checked >= 8


def _sample(kind, candidates: list[str], baseline) -> str:
    """The first candidate ``kind`` accepts that differs from the default."""
    for value in candidates:
        try:
            if kind(value) == baseline:
                continue
        except argparse.ArgumentTypeError:
            continue
        return value
    raise AssertionError(f"no sample value for {kind}")


@pytest.mark.parametrize("flag", _FLAGS, ids=lambda f: f.names[0])
def test_every_environment_variable_in_the_table_sets_its_flag(flag):
    candidates = ["2", "true", "gptq", "float32", "0.5", "off", "fp8", "linear", "false", str(README)]
    baseline = build_parser(env={}).get_default(flag.dest)
    value = _sample(flag.kind, candidates, baseline)
    for env_name in flag.env:
        got = build_parser(env={env_name: value}).get_default(flag.dest)
        assert got == flag.kind(value) != baseline, env_name


# ---- metrics -------------------------------------------------------------------------------------------


def test_metrics_list_is_what_metrics_serves():
    metrics = RouterMetrics()
    served = dict(re.findall(r"^# TYPE (\S+) (\S+)$", metrics.render().decode(), re.M))
    listed = {code_names(name)[0]: kind for name, kind, *_ in table_rows(sections()["Metrics"])}
    assert listed == served


def test_metric_labels_in_the_list_are_the_metrics_labels():
    metrics = RouterMetrics()
    labels = {}
    for metric in vars(metrics).values():
        if hasattr(metric, "_labelnames") and hasattr(metric, "_name"):
            suffix = "_total" if type(metric).__name__ == "Counter" else ""
            labels[metric._name + suffix] = set(metric._labelnames)
    for name, _, label_cell, *_ in table_rows(sections()["Metrics"]):
        assert set(code_names(label_cell)) == labels[code_names(name)[0]], name


# ---- sections and commands -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heading",
    ["Quick start", "Python client", "HTTP API", "Serving a GPTQ model", "Quantizing a model", "bitsandbytes", "Sharding",
     "TLS", "Docker", "Kubernetes", "Configuration", "Metrics"],
)
def test_readme_has_the_section_a_user_expects(heading):
    assert sections()[heading].strip()


def _shell_commands() -> list[list[str]]:
    commands = []
    for text in sections().values():
        for block in code_blocks(text, "sh"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line:
                    commands.append(shlex.split(line))
    return commands


def _launcher_options() -> set[str]:
    return set(build_parser(env={})._option_string_actions)


def _quantize_options() -> set[str]:
    from text_generation_server.quantize.cli import add_quantize_arguments

    parser = argparse.ArgumentParser()
    add_quantize_arguments(parser)
    return set(parser._option_string_actions)


def test_commands_in_the_readme_use_flags_that_exist():
    launcher, quantize = _launcher_options(), _quantize_options()
    checked = 0
    for argv in _shell_commands():
        for i, token in enumerate(argv):
            if token.endswith("text-generation-launcher") or token.startswith("text-generation-server:"):
                # A launcher invocation, or an image whose entrypoint is the launcher.
                options, where = launcher, argv[i + 1:]
            elif token.endswith("text-generation-server") and argv[i + 1:i + 2] == ["quantize"]:
                options, where = quantize, argv[i + 2:]
            else:
                continue
            for flag in (t.split("=", 1)[0] for t in where if t.startswith("--")):
                assert flag in options, f"{' '.join(argv)}: {flag} is not a flag"
                checked += 1
            break
    assert checked >= 10


def test_generating_client_stubs_from_the_proto_works_as_shown(tmp_path):
    """The README's protoc line, run as written in a directory holding proto/, gives importable stubs."""
    (line,) = [c for c in _shell_commands() if "grpc_tools.protoc" in c]
    assert line[0] == "python"
    proto = README.parent / "proto"
    (tmp_path / "proto" / "fmaas").mkdir(parents=True)
    (tmp_path / "proto" / "fmaas" / "generation.proto").write_bytes((proto / "fmaas" / "generation.proto").read_bytes())
    done = subprocess.run([sys.executable, *line[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check = "from fmaas import generation_pb2, generation_pb2_grpc; print(generation_pb2_grpc.GenerationServiceStub.__name__)"
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "GenerationServiceStub"
