"""Which packages the distribution holds, found rather than listed.

The built-in passes live in the top-level ``passes/`` folder but install as
``graphopt.passes`` (and its subpackages), so that no generic top-level name such as
``passes`` reaches site-packages; setuptools' ``packages.find`` cannot rename what it finds,
so the list is computed here. Everything else is in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

CORE = find_packages(include=["graphopt", "graphopt.*"])
PASSES = ["graphopt.passes", *(f"graphopt.passes.{p}" for p in find_packages("passes"))]

setup(packages=CORE + PASSES, package_dir={"graphopt.passes": "passes"})
