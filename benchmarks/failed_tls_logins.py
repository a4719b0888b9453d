"""Run by hand: many failed logins over STARTTLS must leave the server no extra sockets.

Starts `twistd -n mim` on a free loopback port in a temporary directory (failure budgets
off, limits.max_unbound_per_address = 5 by default, so that leaked connections would lock the
address out), makes N failed TLS logins one after another (alternately: three wrong passwords,
waiting for the server to close; two <auth/> in one write, leaving at once after the stream
error), then logs in correctly, and prints the server's open file descriptors and its sockets
on the port before and after.

    .venv/bin/python benchmarks/failed_tls_logins.py --logins 1000
"""

import argparse
import asyncio
import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
)
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
BIND = (
    b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
    b"<resource>check</resource></bind></iq>"
)
TIMEOUT = 10.0
BIN = os.path.dirname(sys.executable)


def plain_auth(user: str, password: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return (
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>".encode()
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def port_sockets(port: int) -> dict[str, int]:
    """Sockets with local port `port` by TCP state (hex as in /proc/net/tcp), but LISTEN."""
    states: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":
                    states[fields[3]] = states.get(fields[3], 0) + 1
    return states


class Connection:
    def __init__(self, port: int, cafile: str) -> None:
        self.port = port
        self.cafile = cafile

    async def secure(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(HEADER + STARTTLS)
        await self.until(b"<proceed")
        await self.writer.start_tls(
            ssl.create_default_context(cafile=self.cafile), server_hostname="localhost"
        )
        self.writer.write(HEADER)
        await self.until(b"</stream:features>")

    async def until(self, marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            chunk = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not chunk:
                raise ConnectionError(f"closed before {marker!r}: {data[-200:]!r}")
            data += chunk
        return data

    def close(self) -> None:
        self.writer.close()


async def wrong_passwords_then_wait(port: int, cafile: str) -> None:
    connection = Connection(port, cafile)
    await connection.secure()
    for _ in range(2):
        connection.writer.write(plain_auth("alice", "wrong"))
        await connection.until(b"</failure>")
    connection.writer.write(plain_auth("alice", "wrong"))
    await connection.until(b"</stream:error>")
    await asyncio.wait_for(connection.reader.read(), TIMEOUT)  # the server closes
    connection.close()


async def two_auths_then_leave(port: int, cafile: str) -> None:
    connection = Connection(port, cafile)
    await connection.secure()
    connection.writer.write(plain_auth("alice", "wrong") * 2)
    await connection.until(b"</stream:stream>")
    connection.close()


async def good_login(port: int, cafile: str) -> None:
    connection = Connection(port, cafile)
    await connection.secure()
    connection.writer.write(plain_auth("alice", "wonderland"))
    await connection.until(b"<success")
    connection.writer.write(HEADER)
    await connection.until(b"</stream:features>")
    connection.writer.write(BIND)
    await connection.until(b"</iq>")
    connection.writer.write(b"</stream:stream>")
    await asyncio.wait_for(connection.reader.read(), TIMEOUT)
    connection.close()


async def run(port: int, cafile: str, pid: int, logins: int) -> None:
    await good_login(port, cafile)  # warm up: the database and the TLS context are open
    await asyncio.sleep(0.5)
    files_before, sockets_before = open_files(pid), port_sockets(port)
    started = time.monotonic()
    for attempt in range(logins):
        if attempt % 2:
            await two_auths_then_leave(port, cafile)
        else:
            await wrong_passwords_then_wait(port, cafile)
    elapsed = time.monotonic() - started
    await asyncio.sleep(1.0)  # the last connections finish closing
    files_after, sockets_after = open_files(pid), port_sockets(port)
    await good_login(port, cafile)
    print(f"{logins} failed TLS logins in {elapsed:.1f} s, then a good login: OK")
    print(f"server open files: before {files_before}, after {files_after}")
    print(
        f"server sockets on the port by state (hex): before {sockets_before}, after {sockets_after}"
    )
    print("(06 = TIME_WAIT, which holds no file; 08 = CLOSE_WAIT, 01 = ESTABLISHED)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=1000)
    parser.add_argument("--max-unbound", type=int, default=5, help="limits.max_unbound_per_address")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mim-check-") as directory:
        config = os.path.join(directory, "mim.toml")
        with open(config, "w") as f:
            f.write(
                '[server]\ndomains = ["localhost"]\ndata_dir = "data"\n'
                f'[[listeners]]\naddress = "127.0.0.1"\nport = {port}\n'
                "[auth]\nfailure_delay = 0.0\naddress_failure_budget = 0\n"
                "account_failure_budget = 0\n"
                f"[limits]\nmax_unbound_per_address = {args.max_unbound}\n"
            )
        subprocess.run(
            [
                os.path.join(BIN, "mimctl"),
                "-c",
                config,
                "register",
                "alice@localhost",
                "--password-stdin",
            ],
            input=b"wonderland\n",
            check=True,
        )
        server = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "mim", "-c", config],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.1)
            cafile = os.path.join(directory, "data", "self-signed.pem")
            asyncio.run(run(port, cafile, server.pid, args.logins))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
