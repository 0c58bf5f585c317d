"""
The installed package holds every module: each package directory of the
source tree is listed in pyproject.toml (an installed mproxy without one
fails to start).
"""

from __future__ import annotations

import os
import tomllib

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PackagesTests(SynchronousTestCase):
    def test_every_package_is_listed(self) -> None:
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
        found = set()
        for directory, dirs, files in os.walk(os.path.join(ROOT, "mproxy")):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            if "__init__.py" in files:
                found.add(os.path.relpath(directory, ROOT).replace(os.sep, "."))
        self.assertEqual(found - listed, set())
