"""wokkel 18 on current Twisted: it imports only after mim_twisted.wokkel_compat.

setup.cfg bounds Twisted to the releases the suite runs on. These tests fail loudly, rather
than skip, when the installed Twisted is outside that range or when wokkel no longer imports
with the shim, so that widening the range is a deliberate step.
"""

import configparser
import os
import subprocess
import sys

from packaging.requirements import Requirement
from twisted.copyright import version as twisted_version
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every wokkel module the server imports.
WOKKEL_MODULES = ("wokkel.data_form", "wokkel.disco", "wokkel.pubsub")


def declared_twisted() -> Requirement:
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    lines = setup["options"]["install_requires"].splitlines()
    requirements = [Requirement(line) for line in lines if line.strip()]
    return next(r for r in requirements if r.name.lower() == "twisted")


class WokkelCompatTests(unittest.TestCase):
    def test_installed_twisted_is_in_the_declared_range(self) -> None:
        requirement = declared_twisted()
        self.assertTrue(
            requirement.specifier.contains(twisted_version),
            f"Twisted {twisted_version} is outside setup.cfg's {requirement}: check that"
            " wokkel still imports with mim_twisted.wokkel_compat, then change the range",
        )

    def test_wokkel_imports_in_a_fresh_interpreter(self) -> None:
        # In this process wokkel may be imported already; a new one shows the real order.
        code = "import mim_twisted\n" + "".join(f"import {name}\n" for name in WOKKEL_MODULES)
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
        )
        self.assertEqual(
            done.returncode,
            0,
            f"wokkel does not import on Twisted {twisted_version} with"
            f" mim_twisted.wokkel_compat:\n{done.stderr}",
        )
