"""Build hook: generate the gRPC stubs from proto/ into the package.

The stubs are generated before setup() runs, so the package discovery in
pyproject.toml sees `text_generation_server.pb` and every build (wheel,
sdist, editable) ships them.
"""

import importlib.util
from pathlib import Path

from setuptools import setup


def build_stubs() -> None:
    here = Path(__file__).resolve().parent
    script = here / "proto" / "build_stubs.py"
    if not script.exists():  # building from an sdist that already carries the stubs
        return
    spec = importlib.util.spec_from_file_location("build_stubs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build()


build_stubs()
setup()
