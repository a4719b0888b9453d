"""The admin socket end to end: mimctl's live commands against a running server with slixmpp
clients, and account commands that end the sessions of the account they change."""

import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

from slixmpp.xmlstream import ET
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThread
from twisted.words.protocols.jabber.jid import JID

import mim_twisted
from mim_twisted import ctl
from mim_twisted.tap import MimService
from tests.ci import unavailable
from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "admin me"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"


class AdminSocketTests(ServerTestCase):
    def server_config(self, directory: str) -> str:
        # A short directory of its own: a UNIX socket path holds at most 107 bytes, and trial's
        # temporary directories are deep.
        socket_directory = tempfile.mkdtemp(prefix="mim-admin-")
        self.addCleanup(shutil.rmtree, socket_directory, True)
        self.socket = os.path.join(socket_directory, "admin.sock")
        return super().server_config(directory) + f'[admin]\nsocket = "{self.socket}"\n'

    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        self.assertEqual(await client.connect(), "session_start")
        return client

    async def mimctl(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        """Run mimctl with the server's own config; (exit status, stdout, stderr)."""
        args = ctl.build_parser().parse_args(list(argv))
        out, err = io.StringIO(), io.StringIO()
        status = await ctl.run(self.server.config, args, io.StringIO(stdin), out, err)
        return status, out.getvalue(), err.getvalue()

    async def stream_error_of(self, client: Client, command: list[str], stdin: str = "") -> str:
        """Run the mimctl command and return the condition of the stream error ``client`` gets."""
        received = client.next_event("stream_error")
        disconnected = client.next_event("disconnected")
        status, out, err = await self.mimctl(*command, stdin=stdin)
        self.assertEqual((status, err), (0, ""))
        self.output = out
        stream_error = await wait_for(received)
        await wait_for(disconnected)
        conditions = [
            child.tag.removeprefix(f"{{{STREAM_ERRORS}}}")
            for child in stream_error.xml
            if child.tag.startswith(f"{{{STREAM_ERRORS}}}") and not child.tag.endswith("}text")
        ]
        self.assertEqual(len(conditions), 1, ET.tostring(stream_error.xml))
        return conditions[0]

    def test_socket_is_private_and_removed_on_stop(self) -> None:
        mode = os.stat(self.socket).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)
        stopping = self.server.stopService()
        return stopping.addCallback(lambda _: self.assertFalse(os.path.exists(self.socket)))

    async def test_a_killed_server_leaves_nothing_in_the_way(self) -> None:
        await self.server.stopService()
        # What kill -9 leaves: the socket file, and its lock naming a process that is gone.
        with socket.socket(socket.AF_UNIX) as left:
            left.bind(self.socket)
        gone = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.symlink(gone.stdout.strip(), self.socket + ".lock")
        restarted = MimService(self.server.config)
        restarted.startService()
        self.addCleanup(restarted.stopService)
        await restarted.ready
        self.assertEqual(stat.S_IMODE(os.stat(self.socket).st_mode), 0o600)

    async def test_a_second_server_on_the_same_socket_does_not_start(self) -> None:
        second = MimService(self.server.config)
        second.startService()
        self.addCleanup(second.stopService)
        with self.assertRaises(CannotListenError):
            await second.ready
        # The first one still answers.
        status, out, _ = await self.mimctl("status")
        self.assertEqual(status, 0)

    async def test_the_installed_script(self) -> None:
        script = os.path.join(os.path.dirname(sys.executable), "mimctl")
        if not os.path.exists(script):
            unavailable(f"mimctl is not installed next to {sys.executable}", "pip install -e .")

        def mimctl(*argv: str) -> subprocess.CompletedProcess:
            command = [script, "-c", self.server.config.source, *argv]
            return subprocess.run(command, capture_output=True, text=True, timeout=60)

        await self.online("alice@localhost/desk")
        done = await deferToThread(mimctl, "sessions")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout.split("\t")[0], "alice@localhost/desk")
        await self.server.stopService()
        done = await deferToThread(mimctl, "status")
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr),
            (1, "", f"mimctl: mim-twisted is not running (no admin socket at {self.socket})\n"),
        )

    async def test_status(self) -> None:
        await self.online("alice@localhost/desk")
        status, out, err = await self.mimctl("status")
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertRegex(lines[0], rf"^mim-twisted {mim_twisted.__version__} running, up ")
        self.assertEqual(
            lines[1:], ["  sessions: 1 (connections: 1)", "  storage: sqlite, answering"]
        )

    async def test_sessions_lists_the_live_sessions(self) -> None:
        await self.online("alice@localhost/desk")
        await self.online("bob@localhost/phone")
        status, out, err = await self.mimctl("sessions")
        self.assertEqual((status, err), (0, ""))
        rows = [line.split("\t") for line in out.splitlines()]
        self.assertEqual([row[0] for row in rows], ["alice@localhost/desk", "bob@localhost/phone"])
        for _, peer, since, tls, mechanism in rows:
            self.assertRegex(peer, r"^127\.0\.0\.1:\d+$")
            self.assertRegex(since, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
            self.assertEqual((tls, mechanism), ("TLS", "SCRAM-SHA-256"))
        status, out, _ = await self.mimctl("sessions", "localhost")
        self.assertEqual(len(out.splitlines()), 2)

    async def test_kick_a_full_jid_ends_that_session_only(self) -> None:
        desk = await self.online("alice@localhost/desk")
        phone = await self.online("alice@localhost/phone")
        condition = await self.stream_error_of(desk, ["kick", "alice@localhost/desk"])
        self.assertEqual(condition, "policy-violation")
        self.assertEqual(self.output, "ended the session of alice@localhost/desk\n")
        self.assertTrue(phone.xmpp.is_connected())
        status, out, _ = await self.mimctl("sessions")
        self.assertEqual(out.split("\t")[0], "alice@localhost/phone")

    async def test_kick_a_bare_jid_ends_all_its_sessions(self) -> None:
        desk = await self.online("alice@localhost/desk")
        phone = await self.online("alice@localhost/phone")
        phone_gone = phone.next_event("disconnected")
        self.assertEqual(
            await self.stream_error_of(desk, ["kick", "alice@localhost"]), "policy-violation"
        )
        await wait_for(phone_gone)
        self.assertEqual(len(self.output.splitlines()), 2)

    async def test_kick_without_session_fails(self) -> None:
        status, out, err = await self.mimctl("kick", "bob@localhost")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mimctl: bob@localhost has no session\n")

    async def test_unregister_ends_the_sessions_of_the_account(self) -> None:
        alice = await self.online("alice@localhost/desk")
        bob = await self.online("bob@localhost/desk")
        condition = await self.stream_error_of(alice, ["unregister", "alice@localhost"])
        self.assertEqual(condition, "not-authorized")
        self.assertEqual(
            self.output,
            "unregistered alice@localhost\nended 1 live session(s) (not-authorized)\n",
        )
        # Nothing of the session is left to answer a ping, and the account cannot log in again.
        await eventually(lambda: not self.server.core.sessions.sessions_of(JID("alice@localhost")))
        again = self.client("alice@localhost/desk", PASSWORD)
        self.assertEqual(await again.connect(), "failed_auth")
        self.assertTrue(bob.xmpp.is_connected())

    async def test_passwd_resets_the_sessions_of_the_account(self) -> None:
        alice = await self.online("alice@localhost/desk")
        condition = await self.stream_error_of(
            alice, ["passwd", "--password-stdin", "alice@localhost"], stdin="new secret\n"
        )
        self.assertEqual(condition, "reset")
        renewed = self.client("alice@localhost/desk", "new secret")
        self.assertEqual(await renewed.connect(), "session_start")

    async def test_passwd_is_enforced_at_once_after_a_login(self) -> None:
        # The login before holds alice's credentials in the server's cache: the change must
        # still refuse the old password on the next login.
        alice = await self.online("alice@localhost/desk")
        await alice.close()
        status, _, err = await self.mimctl(
            "passwd", "--password-stdin", "alice@localhost", stdin="new secret\n"
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(await self.client("alice@localhost/a", PASSWORD).connect(), "failed_auth")
        renewed = self.client("alice@localhost/b", "new secret")
        self.assertEqual(await renewed.connect(), "session_start")

    async def test_unregister_is_enforced_at_once_after_a_login(self) -> None:
        alice = await self.online("alice@localhost/desk")
        await alice.close()
        status, _, err = await self.mimctl("unregister", "alice@localhost")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(await self.client("alice@localhost/a", PASSWORD).connect(), "failed_auth")

    async def test_stats(self) -> None:
        alice = await self.online("alice@localhost/desk")
        await self.online("bob@localhost/desk")
        alice.xmpp.send_message(mto="bob@localhost/desk", mbody="hello")
        await eventually(lambda: self.server.core.router.messages.outcomes["delivered"] == 1)
        status, out, err = await self.mimctl("stats")
        self.assertEqual((status, err), (0, ""))
        counters = dict(line.rsplit(" ", 1) for line in out.splitlines())
        self.assertEqual(counters["logins mechanism=SCRAM-SHA-256 result=success"], "2")
        self.assertEqual(counters["messages outcome=delivered"], "1")
        self.assertEqual(counters["stanzas_in kind=message"], "1")
