"""Owner-only access to the data directory and the files in it, whatever the umask.

The database holds every account's SCRAM keys and the data directory the TLS private key: other
local users must not read them. New directories are made 0700 and new files 0600; ones left
readable by an earlier version are tightened at start, and each change is logged.
"""

import os
import stat

from twisted.logger import Logger

log = Logger()

PRIVATE_DIRECTORY_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def _tighten(path: str, mode: int) -> None:
    """Take group's and others' permissions off ``path`` (of mode ``mode``), logging it."""
    private = stat.S_IMODE(mode) & 0o700
    if private != stat.S_IMODE(mode):
        os.chmod(path, private)
        log.info(
            "Tightened the permissions of {path} from {old} to {new}: only the owner may read it",
            path=path,
            old=f"{stat.S_IMODE(mode):04o}",
            new=f"{private:04o}",
        )


def secure_directory(path: str) -> None:
    """Make the directory ``path`` (and missing parents) 0700, or tighten an existing one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        try:
            os.makedirs(path, mode=PRIVATE_DIRECTORY_MODE)
        except FileExistsError:
            # Another process (a worker starting beside this one) made it meanwhile.
            _tighten(path, os.stat(path).st_mode)
            return
        # makedirs' mode passes through the umask, which may take more than group and others.
        os.chmod(path, PRIVATE_DIRECTORY_MODE)
        return
    _tighten(path, mode)


def secure_file(path: str) -> None:
    """Create the file ``path`` empty with mode 0600 if missing, or tighten an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        _tighten(path, os.stat(path).st_mode)
        return
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


def secure_existing_file(path: str) -> None:
    """Tighten the file ``path`` if it exists."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    _tighten(path, mode)


def secure_data_directory(path: str) -> None:
    """Make the data directory ``path`` private, with every file directly in it."""
    secure_directory(path)
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                _tighten(entry.path, entry.stat(follow_symlinks=False).st_mode)
