"""A small Dockerfile reader and .dockerignore matcher for tests that cannot build images.

It understands what the project's Dockerfile uses: line continuations,
comments, build stages (``FROM base AS name``, stages built on stages),
``ARG`` scoping (global ARGs reach ``FROM`` lines; a stage sees an ARG only
after declaring it), ``ENV`` in both forms (inherited by stages built on a
stage), exec and shell forms, and instruction flags (``--from=``). Anything
it does not understand (heredocs, a custom escape directive) raises
``DockerfileError`` instead of being read wrongly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:[-+][^}]*)?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class DockerfileError(ValueError):
    """The Dockerfile uses something this reader does not model."""


def expand(text: str, values: dict[str, str]) -> str:
    """Docker's variable substitution: ``$V``, ``${V}``, ``${V:-default}``, ``${V:+alt}``.

    Unknown variables are left as written, so a test can still see them.
    """

    def sub(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("bare")
        op = m.group("op")
        if op:
            word = op[2:]
            if op.startswith(":-"):
                return values.get(name) or word
            return word if values.get(name) else ""
        return values.get(name, m.group(0))

    return _VAR.sub(sub, text)


def variables_used(text: str) -> set[str]:
    """Names referenced as ``$V`` or ``${V...}`` in ``text``."""
    return {m.group("braced") or m.group("bare") for m in _VAR.finditer(text)}


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    value: str  # everything after the keyword, continuation lines joined
    line: int  # 1-based line of the keyword

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        text = self.value.strip()
        if not text.startswith("["):
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None  # Docker runs a malformed array as a shell command
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            return None
        return parsed

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` flags and the remaining text."""
        flags: dict[str, str] = {}
        rest = self.value.strip()
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            name, _, value = token[2:].partition("=")
            flags[name] = value
            rest = rest.lstrip()
        return flags, rest


@dataclass
class Stage:
    index: int
    name: str | None
    base: str  # after global ARG expansion
    parent: Stage | None  # the stage this one is built FROM, if any
    instructions: list[Instruction] = field(default_factory=list)
    global_args: dict[str, str] = field(default_factory=dict)

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword.upper()]

    def chain(self) -> list[Stage]:
        """This stage's ancestry, root first."""
        stages: list[Stage] = []
        stage: Stage | None = self
        while stage is not None:
            stages.append(stage)
            stage = stage.parent
        return stages[::-1]

    def scope_at(self, position: int) -> dict[str, str]:
        """ARG and ENV values visible before instruction ``position`` of this stage."""
        values = dict(self.parent.env()) if self.parent is not None else {}
        for instr in self.instructions[:position]:
            if instr.keyword == "ARG":
                for decl in shlex.split(instr.value):
                    name, eq, default = decl.partition("=")
                    if name not in values:
                        values[name] = default if eq else self.global_args.get(name, "")
            elif instr.keyword == "ENV":
                values.update(parse_env(instr.value, values))
        return values

    def env(self) -> dict[str, str]:
        """The image's environment at the end of this stage (inherited ENV included)."""
        values = dict(self.parent.env()) if self.parent is not None else {}
        for pos, instr in enumerate(self.instructions):
            if instr.keyword == "ENV":
                values.update(parse_env(instr.value, self.scope_at(pos)))
        return values

    def declared_before(self, position: int) -> set[str]:
        """Names a build step at ``position`` may reference (declared ARGs and ENVs)."""
        return set(self.scope_at(position))

    def runs(self) -> list[tuple[Instruction, str]]:
        """Each RUN with its command as the build would see it (ARG/ENV values substituted)."""
        out = []
        for pos, instr in enumerate(self.instructions):
            if instr.keyword == "RUN":
                _, command = instr.flags_and_rest()
                out.append((instr, expand(command, self.scope_at(pos))))
        return out

    def last(self, keyword: str) -> Instruction | None:
        """The last instruction of a kind, looking through parent stages (ENTRYPOINT, USER, ...)."""
        for stage in reversed(self.chain()):
            found = stage.find(keyword)
            if found:
                return found[-1]
        return None


def parse_env(value: str, scope: dict[str, str]) -> dict[str, str]:
    """The variables one ENV instruction sets (``k=v ...`` or legacy ``k v``)."""
    tokens = shlex.split(value, posix=True)
    if tokens and "=" not in tokens[0]:
        name, _, rest = value.strip().partition(" ")
        return {name: expand(rest.strip(), scope)}
    result: dict[str, str] = {}
    for token in tokens:
        name, eq, raw = token.partition("=")
        if not eq:
            raise DockerfileError(f"ENV {value!r}: {token!r} is not name=value")
        result[name] = expand(raw, {**scope, **result})
    return result


@dataclass
class Dockerfile:
    stages: list[Stage]
    global_args: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> Dockerfile:
        return cls.parse(path.read_text())

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        instructions = _logical_lines(text)
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        by_name: dict[str, Stage] = {}
        for instr in instructions:
            if instr.keyword == "FROM":
                flags, rest = instr.flags_and_rest()
                parts = rest.split()
                if len(parts) == 3 and parts[1].upper() == "AS":
                    base, name = parts[0], parts[2].lower()
                elif len(parts) == 1:
                    base, name = parts[0], None
                else:
                    raise DockerfileError(f"line {instr.line}: cannot read FROM {instr.value!r}")
                base = expand(base, global_args)
                parent = by_name.get(base.lower())
                stage = Stage(len(stages), name, base, parent, global_args=global_args)
                stages.append(stage)
                if name:
                    if name in by_name:
                        raise DockerfileError(f"line {instr.line}: stage name {name!r} used twice")
                    by_name[name] = stage
            elif not stages:
                if instr.keyword != "ARG":
                    raise DockerfileError(f"line {instr.line}: only ARG may come before the first FROM")
                for decl in shlex.split(instr.value):
                    name, _, default = decl.partition("=")
                    global_args[name] = default
            else:
                stages[-1].instructions.append(instr)
        if not stages:
            raise DockerfileError("no FROM instruction")
        return cls(stages, global_args)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def default_target(self) -> Stage:
        """What ``docker build`` without ``--target`` produces: the last stage."""
        return self.stages[-1]


def _logical_lines(text: str) -> list[Instruction]:
    lines = text.splitlines()
    if lines and re.match(r"#\s*escape\s*=", lines[0], re.I):
        raise DockerfileError("the escape parser directive is not supported")
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments and blank lines, also inside a continuation
        if not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(p for p in pending if p)
        pending = []
        keyword, _, value = logical.partition(" ")
        if "<<" in value and keyword.upper() in {"RUN", "COPY", "ADD"}:
            raise DockerfileError(f"line {start}: heredocs are not supported")
        out.append(Instruction(keyword.upper(), value.strip(), start))
    if pending:
        raise DockerfileError("the file ends inside a line continuation")
    return out


# ---------------------------------------------------------------------------
# .dockerignore
# ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise DockerfileError(f".dockerignore pattern {pattern!r}: unclosed [")
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass
class DockerIgnore:
    """Docker's .dockerignore rules: the last matching pattern wins, ``!`` re-includes,
    and a pattern that matches a directory excludes everything under it."""

    rules: list[tuple[bool, re.Pattern[str], str]]

    @classmethod
    def load(cls, path: Path) -> DockerIgnore:
        return cls.parse(path.read_text() if path.exists() else "")

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line[1:].strip() if include else line
            pattern = pattern.strip("/")
            pattern = re.sub(r"/+", "/", pattern)
            if pattern.startswith("./"):
                pattern = pattern[2:]
            rules.append((include, _pattern_regex(pattern), line))
        return cls(rules)

    def excluded(self, relpath: str) -> bool:
        """Whether ``relpath`` (relative to the context, '/'-separated) stays out of the context."""
        parts = relpath.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for include, regex, _ in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not include
        return result

    def context_files(self, root: Path) -> list[str]:
        """Every file under ``root`` that the build context would contain."""
        # Without "!" rules nothing under an excluded directory can come back,
        # so such directories (.venv, .git) are not walked at all.
        can_prune = not any(include for include, _, _ in self.rules)
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            prefix = "" if rel_dir == "." else rel_dir + "/"
            if can_prune:
                dirnames[:] = [d for d in dirnames if not self.excluded(prefix + d)]
            files.extend(prefix + f for f in filenames if not self.excluded(prefix + f))
        return sorted(files)
