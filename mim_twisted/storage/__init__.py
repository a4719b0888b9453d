"""Storage: the interfaces, their backends, and ``open_database`` to get a ready database."""

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred

from mim_twisted.storage import migrations
from mim_twisted.storage.interfaces import IDatabase, SchemaOutdated

BACKENDS = ("memory", "sqlite", "postgresql", "mysql")


def open_database(
    backend: str,
    *,
    sqlite_path: str | None = None,
    postgresql_dsn: str | None = None,
    mysql_options: Mapping[str, Any] | None = None,
    pool_size: int = 4,
    auto_migrate: bool,
) -> Deferred[IDatabase]:
    """Open the database of ``backend`` (one of BACKENDS) with its schema at the newest version.

    ``mysql_options`` are PyMySQL's connect() keyword arguments (host, port, database, user,
    password, unix_socket).

    An outdated schema is migrated when ``auto_migrate`` is true and is otherwise a
    SchemaOutdated failure; a schema newer than this code is a SchemaTooNew failure. On failure
    the database is closed again.
    """
    return Deferred.fromCoroutine(
        _open_database(backend, sqlite_path, postgresql_dsn, mysql_options, pool_size, auto_migrate)
    )


async def _open_database(
    backend: str,
    sqlite_path: str | None,
    postgresql_dsn: str | None,
    mysql_options: Mapping[str, Any] | None,
    pool_size: int,
    auto_migrate: bool,
) -> IDatabase:
    database = await connect_database(
        backend, sqlite_path, postgresql_dsn, pool_size, mysql_options=mysql_options
    )
    try:
        installed = await database.schema_version()
        newest = migrations.newest_version()
        if migrations.needs_migration(installed, newest):
            if not auto_migrate:
                raise SchemaOutdated(
                    f"the database schema is at version {installed}, this code needs version "
                    f"{newest}: run `mimctl migrate`"
                )
            await database.migrate()
    except BaseException:
        await database.close()
        raise
    return database


async def connect_database(
    backend: str,
    sqlite_path: str | None,
    postgresql_dsn: str | None,
    pool_size: int,
    *,
    mysql_options: Mapping[str, Any] | None = None,
) -> IDatabase:
    """The database of ``backend``, connected but with its schema unchecked (for migrating)."""
    # Backends are imported on use: a server driver need not load for SQLite, and back.
    if backend == "memory":
        from mim_twisted.storage.memory import MemoryDatabase

        return MemoryDatabase()
    if backend == "sqlite":
        if not sqlite_path:
            raise ValueError("the sqlite storage backend needs sqlite_path")
        from mim_twisted.storage.sqlite import SQLiteDatabase

        return SQLiteDatabase(sqlite_path)
    if backend == "postgresql":
        if not postgresql_dsn:
            raise ValueError("the postgresql storage backend needs postgresql_dsn")
        from mim_twisted.storage.postgres import PostgresDatabase

        return await PostgresDatabase(postgresql_dsn, pool_size).start()
    if backend == "mysql":
        if mysql_options is None:
            raise ValueError("the mysql storage backend needs mysql_options")
        from mim_twisted.storage.mysql import MySQLDatabase

        return await MySQLDatabase(mysql_options, pool_size).start()
    raise ValueError(f"unknown storage backend {backend!r}, expected one of {', '.join(BACKENDS)}")
