"""PostgreSQL for tests: a throwaway database per test, or a skip (a failure on CI) without one.

The server is found through ``MIM_TEST_PG_DSN``, a libpq connection string whose role may create
databases; the default suits a local server with trust authentication.
"""

import os
import secrets
import time
from typing import NoReturn

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn
from twisted.trial.unittest import TestCase

from tests.ci import unavailable

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=root dbname=postgres"


def base_dsn() -> str:
    return os.environ.get("MIM_TEST_PG_DSN", DEFAULT_DSN)


def _connect_admin() -> psycopg2.extensions.connection:
    """An autocommit connection to the base DSN (CREATE/DROP DATABASE refuse transactions)."""
    try:
        connection = psycopg2.connect(base_dsn(), connect_timeout=5)
    except psycopg2.OperationalError as error:
        reason = str(error).strip()
        postgresql_unavailable(f"cannot connect to PostgreSQL at {base_dsn()!r}: {reason}")
    connection.autocommit = True
    return connection


def postgresql_unavailable(reason: str) -> NoReturn:
    """Skip the running test, or fail it when CI=true (see tests/ci.py)."""
    unavailable(reason, "set MIM_TEST_PG_DSN to a reachable PostgreSQL server")


def create_temp_database(test: TestCase) -> str:
    """Create an empty database that is dropped when ``test`` ends; its DSN."""
    name = f"mim_test_{os.getpid()}_{secrets.token_hex(4)}"
    connection = _connect_admin()
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        connection.close()
    test.addCleanup(drop_database, name)
    return make_dsn(base_dsn(), dbname=name)


def drop_database(name: str) -> None:
    connection = _connect_admin()
    try:
        with connection.cursor() as cursor:
            # A connection left open by a failed test would make DROP DATABASE refuse.
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    finally:
        connection.close()


def terminate_backends(dsn: str, *, sparing: tuple[int, ...] = ()) -> int:
    """End the server processes of ``dsn``'s database (but those of ``sparing``), as a restart
    does, and wait until they are gone; how many there were.

    This blocks: the reactor does not run meanwhile, so the clients learn of it only when they
    next use their connections or the reactor reads what the server sent them before closing.
    """
    name = parse_dsn(dsn)["dbname"]
    connection = _connect_admin()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid() AND NOT pid = ANY(%s)",
                (name, list(sparing)),
            )
            [(terminated,)] = cursor.fetchall()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                    " AND pid <> pg_backend_pid() AND NOT pid = ANY(%s)",
                    (name, list(sparing)),
                )
                if cursor.fetchone()[0] == 0:
                    return terminated
                time.sleep(0.01)
            raise AssertionError(f"the server processes of {name} outlived pg_terminate_backend")
    finally:
        connection.close()
