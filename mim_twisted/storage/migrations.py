"""The schema files and the decision of what to run on a database: pure logic, no I/O but reading.

A schema directory holds ``<backend>.sql``, the full schema at the newest version, and
``upgrades/<backend>/NNN.sql``, the script that takes a database from version NNN-1 to NNN. The
newest version is the highest NNN of any backend (1 while there are none), so adding an upgrade
is: write ``NNN.sql`` for every backend and apply the same change to each ``<backend>.sql``.

Each backend runs a plan in one transaction, recording each step's version in ``schema_version``.
"""

import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from mim_twisted.storage.interfaces import SchemaTooNew

SCHEMA_DIR: Traversable = files(__package__) / "schema"

_UPGRADE_NAME = re.compile(r"(\d{3})\.sql")

# What may contain a ";" that does not end a statement, and the ";" itself. Comments are matched
# too so that they can be dropped: a script's trailing comment is not a statement.
_TOKEN = re.compile(
    r"""
      --[^\n]*                                      # line comment
    | /\*.*?\*/                                     # block comment
    | '(?:[^']|'')*'                                # string literal ('' is a quote)
    | "(?:[^"]|"")*"                                # quoted identifier
    | (?P<tag>\$(?:[A-Za-z_]\w*)?\$).*?(?P=tag)     # PostgreSQL dollar-quoted body
    | ;
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class Step:
    """Statements to run, after which the database is at ``version``."""

    version: int
    statements: list[str]


def split_statements(script: str) -> list[str]:
    """The statements of an SQL script, without their ``;`` and without comments."""
    statements = []
    current: list[str] = []
    position = 0
    for match in _TOKEN.finditer(script):
        current.append(script[position : match.start()])
        position = match.end()
        token = match.group()
        if token == ";":
            statements.append("".join(current).strip())
            current = []
        elif token.startswith(("--", "/*")):
            current.append(" ")  # a comment separates tokens like whitespace
        else:
            current.append(token)
    current.append(script[position:])
    statements.append("".join(current).strip())
    return [statement for statement in statements if statement]


def _upgrade_scripts(schema_dir: Traversable) -> list[Traversable]:
    upgrades = schema_dir / "upgrades"
    if not upgrades.is_dir():
        return []
    backends = [entry for entry in upgrades.iterdir() if entry.is_dir()]
    return [script for backend in backends for script in backend.iterdir()]


def newest_version(schema_dir: Traversable = SCHEMA_DIR) -> int:
    """The schema version this code creates and upgrades to."""
    versions = [
        int(match.group(1))
        for script in _upgrade_scripts(schema_dir)
        if (match := _UPGRADE_NAME.fullmatch(script.name))
    ]
    return max(versions, default=1)


def needs_migration(installed: int, newest: int) -> bool:
    """Whether a database at ``installed`` must be migrated; SchemaTooNew if it is ahead."""
    if installed > newest:
        raise SchemaTooNew(
            f"the database schema is at version {installed}, newer than version {newest} "
            "of this code: upgrade mim-twisted"
        )
    return installed < newest


def plan(installed: int, backend: str, schema_dir: Traversable = SCHEMA_DIR) -> list[Step]:
    """What brings a ``backend`` database at version ``installed`` (0: empty) to the newest."""
    newest = newest_version(schema_dir)
    if not needs_migration(installed, newest):
        return []
    if installed == 0:
        full_schema = (schema_dir / f"{backend}.sql").read_text(encoding="utf-8")
        return [Step(newest, split_statements(full_schema))]
    steps = []
    for version in range(installed + 1, newest + 1):
        script = schema_dir / "upgrades" / backend / f"{version:03d}.sql"
        if not script.is_file():
            # A packaging mistake; running the later scripts without it would corrupt the schema.
            raise FileNotFoundError(f"missing schema upgrade script {backend}/{version:03d}.sql")
        steps.append(Step(version, split_statements(script.read_text(encoding="utf-8"))))
    return steps
