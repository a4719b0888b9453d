"""MySQL or MariaDB for tests: a throwaway database per test, or a skip (a failure on CI)
without one.

The server is found through ``MIM_TEST_MYSQL`` (``host:port``, default 127.0.0.1:3306), as
``MIM_TEST_MYSQL_USER`` (default root, with ``MIM_TEST_MYSQL_PASSWORD``, default empty), a user
that may create databases.
"""

import os
import secrets
import time
from typing import Any, NoReturn

import pymysql
from twisted.trial.unittest import TestCase

from tests.ci import unavailable


def server_options() -> dict[str, Any]:
    """PyMySQL's connect() keyword arguments for the test server, without a database."""
    host, _, port = os.environ.get("MIM_TEST_MYSQL", "127.0.0.1:3306").rpartition(":")
    return {
        "host": host,
        "port": int(port),
        "user": os.environ.get("MIM_TEST_MYSQL_USER", "root"),
        "password": os.environ.get("MIM_TEST_MYSQL_PASSWORD", ""),
    }


def connect(**options: Any) -> pymysql.connections.Connection:
    """A connection to the test server, autocommit unless ``options`` say otherwise (skipping
    the test without a server)."""
    defaults = {"charset": "utf8mb4", "autocommit": True, "connect_timeout": 5}
    try:
        return pymysql.connect(**server_options(), **{**defaults, **options})
    except pymysql.err.OperationalError as error:
        where = "{host}:{port}".format(**server_options())
        mysql_unavailable(f"cannot connect to MySQL at {where}: {error.args[-1]}")


def mysql_unavailable(reason: str) -> NoReturn:
    """Skip the running test, or fail it when CI=true (see tests/ci.py)."""
    unavailable(reason, "set MIM_TEST_MYSQL to a reachable MySQL or MariaDB server")


def create_temp_database(test: TestCase) -> dict[str, Any]:
    """Create an empty utf8mb4 database that is dropped when ``test`` ends; the connect()
    options that reach it."""
    name = f"mim_test_{os.getpid()}_{secrets.token_hex(4)}"
    connection = connect()
    try:
        with connection.cursor() as cursor:
            # A server whose default is latin1 or a case-insensitive collation is no excuse:
            # the schema names its own, and the database's default is only a fallback.
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    finally:
        connection.close()
    test.addCleanup(drop_database, name)
    return {**server_options(), "database": name}


def drop_database(name: str) -> None:
    connection = connect()
    try:
        with connection.cursor() as cursor:
            # A connection left open by a failed test would hold metadata locks.
            kill_connections(cursor, name)
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        connection.close()


def kill_connections(cursor: pymysql.cursors.Cursor, name: str, sparing: tuple = ()) -> int:
    cursor.execute(
        "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
        (name,),
    )
    ids = [thread_id for (thread_id,) in cursor.fetchall() if thread_id not in sparing]
    for thread_id in ids:
        try:
            cursor.execute(f"KILL {int(thread_id)}")
        except pymysql.err.OperationalError:
            pass  # gone meanwhile
    return len(ids)


def terminate_connections(options: dict[str, Any], *, sparing: tuple[int, ...] = ()) -> int:
    """End the server's connections to ``options``'s database (but those of ``sparing``), as a
    restart does, and wait until they are gone; how many there were."""
    name = options["database"]
    connection = connect()
    try:
        with connection.cursor() as cursor:
            killed = kill_connections(cursor, name, sparing)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                cursor.execute(
                    "SELECT id FROM information_schema.processlist"
                    " WHERE db = %s AND id <> CONNECTION_ID()",
                    (name,),
                )
                if not [i for (i,) in cursor.fetchall() if i not in sparing]:
                    return killed
                time.sleep(0.01)
            raise AssertionError(f"the connections to {name} outlived KILL")
    finally:
        connection.close()
