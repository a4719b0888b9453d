"""What a test does when something it needs is missing: skip on a developer's machine, fail in
CI (CI=true), because a CI run must not pass by skipping."""

import os
from typing import NoReturn

from twisted.trial.unittest import FailTest, SkipTest


def unavailable(reason: str, hint: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        raise FailTest(f"{reason} (CI=true, so this test must run; {hint})")
    raise SkipTest(f"{reason} ({hint})")
