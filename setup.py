"""Build hook: generate the gRPC stubs from proto/ into the package."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStubs(build_py):
    def run(self):
        here = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_file_location("build_stubs", here / "proto" / "build_stubs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
