"""Stream errors reach real clients as stream errors, and every closed stream lets go of its
socket, on TLS as on plain TCP, so failed logins never lock an address out."""

import os
import ssl

from twisted.internet import defer

from mim_twisted.xmpp import c2s
from tests.e2e.harness import STREAM_HEADER, RawClient, ServerTestCase, eventually, wait_for
from tests.wire import parse_server_output

STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
WRONG_PLAIN = (  # alice / wrong
    b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHdyb25n</auth>"
)
MAX_UNBOUND = 5


def server_sockets(port: int) -> list[str]:
    """The TCP states (hex, as /proc/net/tcp writes them) of the sockets whose local port is
    `port`, other than the listening socket and those in TIME_WAIT (which hold no file)."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] not in ("0A", "06"):
                    states.append(fields[3])
    return states


def open_sockets() -> int:
    """Sockets this process holds (the server and the test clients share it)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
        except OSError:  # closed since listed
            pass
    return count


class ConflictTests(ServerTestCase):
    async def test_a_replaced_session_gets_a_conflict_stream_error(self) -> None:
        await self.start_server()
        await self.register("alice", "wonderland")
        first = self.client("alice@localhost/same", "wonderland")
        self.assertEqual(await first.connect(), "session_start")
        stream_error = first.next_event("stream_error")
        second = self.client("alice@localhost/same", "wonderland")
        self.assertEqual(await second.connect(), "session_start")
        error = await wait_for(stream_error)
        self.assertEqual(error["condition"], "conflict")


class TlsClientTestCase(ServerTestCase):
    """Raw clients that fail in various ways after STARTTLS."""

    def server_config(self, directory: str) -> str:
        # Many failures from one address: the failure budgets would refuse the good client.
        return (
            super()
            .server_config(directory)
            .replace("[auth]\n", "[auth]\naddress_failure_budget = 0\naccount_failure_budget = 0\n")
        )

    async def setUp(self) -> None:
        await self.start_server()
        await self.register("alice", "wonderland")
        self.factory = self.server.factories[0]

    async def secure(self) -> RawClient:
        """A raw connection after STARTTLS and the second stream header."""
        raw = RawClient(self.port)
        await raw.connect()
        await raw.send(STREAM_HEADER + STARTTLS)
        self.assertIn(b"<proceed", await raw.read_until(b"<proceed"))
        await raw.starttls(ssl.create_default_context(cafile=self.certificate))
        await raw.send(STREAM_HEADER)
        await raw.read_until(b"</stream:features>")
        return raw

    async def wrong_passwords_then_wait_for_the_server(self) -> bytes:
        raw = await self.secure()
        for _ in range(2):
            await raw.send(WRONG_PLAIN)
            await raw.read_until(b"</failure>")
        await raw.send(WRONG_PLAIN)
        answer = await raw.read_until_closed()
        raw.close()
        return answer

    async def two_auths_then_leave(self) -> bytes:
        raw = await self.secure()
        await raw.send(WRONG_PLAIN + WRONG_PLAIN)
        answer = await raw.read_until(b"</stream:stream>")
        raw.close()
        return answer

    async def idle_until_timed_out(self) -> bytes:
        raw = await self.secure()
        answer = await raw.read_until_closed()
        raw.close()
        return answer

    def assertNothingLeft(self) -> None:
        self.assertEqual(self.factory.streams, set())
        self.assertEqual(self.factory._unbound, {})
        self.assertEqual(server_sockets(self.port), [])


class FailedTlsLoginTests(TlsClientTestCase):
    extra_config = f"[limits]\nmax_unbound_per_address = {MAX_UNBOUND}\n"

    async def test_failed_logins_leave_nothing_behind(self) -> None:
        await self.two_auths_then_leave()  # first use opens the database's connections
        await eventually(lambda: not self.factory.streams)
        sockets = open_sockets()
        for attempt in range(60):
            if attempt % 2:
                answer = await self.two_auths_then_leave()
            else:
                answer = await self.wrong_passwords_then_wait_for_the_server()
            self.assertEqual(parse_server_output(answer).stream_error(), "policy-violation")
            await eventually(lambda: not self.factory.streams)
        await eventually(lambda: open_sockets() <= sockets and not server_sockets(self.port))
        self.assertNothingLeft()
        alice = self.client("alice@localhost/after", "wonderland")
        self.assertEqual(await alice.connect(), "session_start")

    async def test_more_failed_logins_at_once_than_the_address_may_hold(self) -> None:
        for _ in range(3):
            answers = await defer.gatherResults(
                [defer.ensureDeferred(self.two_auths_then_leave()) for _ in range(MAX_UNBOUND)]
            )
            for answer in answers:
                self.assertEqual(parse_server_output(answer).stream_error(), "policy-violation")
            await eventually(lambda: not self.factory.streams)
        await eventually(lambda: not server_sockets(self.port))
        self.assertNothingLeft()
        alice = self.client("alice@localhost/after", "wonderland")
        self.assertEqual(await alice.connect(), "session_start")

    async def test_a_client_that_never_answers_the_close_is_cut(self) -> None:
        self.patch(c2s, "CLOSE_GRACE", 0.5)
        raw = await self.secure()
        await raw.send(WRONG_PLAIN + WRONG_PLAIN)
        await raw.read_until(b"</stream:stream>")
        # The client stops reading: it never sees the server's close_notify, never answers it.
        raw.writer.transport.pause_reading()
        await eventually(lambda: not self.factory.streams, timeout=3)
        self.assertNothingLeft()
        raw.close()


class TlsAuthTimeoutTests(TlsClientTestCase):
    extra_config = "[limits]\nauth_timeout = 0.5\n"

    async def test_an_idle_tls_connection_is_timed_out_and_closed(self) -> None:
        answer = await self.idle_until_timed_out()
        self.assertEqual(parse_server_output(answer).stream_error(), "connection-timeout")
        await eventually(lambda: not self.factory.streams and not server_sockets(self.port))
        self.assertNothingLeft()
