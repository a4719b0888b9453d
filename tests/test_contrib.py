"""contrib/mim-twisted.service: a systemd unit that systemd accepts, running the foreground server
with a restart on failure, a dedicated user and hardening."""

import configparser
import os
import shutil
import subprocess
import sys

from twisted.trial import unittest

from tests.ci import unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "contrib", "mim-twisted.service")
INSTALLED_TWISTD = "/opt/mim-twisted/bin/twistd"


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read(UNIT)
    return unit


class SystemdUnitTests(unittest.TestCase):
    def test_foreground_server_restarted_on_failure(self) -> None:
        service = read_unit()["Service"]
        self.assertEqual(
            service["ExecStart"].split(),
            [INSTALLED_TWISTD, "-n", "--pidfile=", "mim", "-c", "/etc/mim-twisted/mim.toml"],
        )
        self.assertEqual(service["Restart"], "on-failure")
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertEqual((service["User"], service["Group"]), ("mim", "mim"))

    def test_hardening(self) -> None:
        service = read_unit()["Service"]
        for key, value in {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ReadWritePaths": "/var/lib/mim-twisted",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "CapabilityBoundingSet": "",
        }.items():
            self.assertEqual(service[key], value, key)

    def test_systemd_accepts_it(self) -> None:
        # systemd is part of the machine image CI runs on: missing there, the check must fail.
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            unavailable("systemd-analyze is not installed", "apt-get install systemd")
        # verify also checks that ExecStart's program exists: point it at this twistd.
        with open(UNIT) as f:
            text = f.read()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "mim-twisted.service")
        with open(path, "w") as f:
            f.write(text.replace(INSTALLED_TWISTD, twistd))
        done = subprocess.run([analyze, "verify", path], capture_output=True, text=True)
        # Unknown keys and bad values are warnings on stderr, with exit status 0.
        self.assertEqual((done.returncode, done.stderr), (0, ""))
