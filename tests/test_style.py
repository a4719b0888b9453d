"""The code base stays `ruff` clean (lint and formatting), checked with the rest of the suite."""

import os
import sys

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUFF = os.path.join(os.path.dirname(sys.executable), "ruff")


class RuffTests(unittest.TestCase):
    async def check(self, *args: str) -> None:
        out, err, code = await getProcessOutputAndValue(RUFF, args, path=ROOT, env=os.environ)
        self.assertEqual(code, 0, (out + err).decode())

    async def test_lint(self) -> None:
        await self.check("check", ".")

    async def test_format(self) -> None:
        await self.check("format", "--check", ".")
