"""Reading JSON with a clear error; atomic writes (a file is written under a temporary name, then
renamed, so it is never half-written); a lock file that one process holds at a time."""
import errno
import fcntl
import json
import os
import re
import socket
import time

from utils.errors import UserError


def files_by_id(folder, pattern):
    """{number: file name} of the files in ``folder`` whose name ``pattern`` finds (its first group is the
    number); one os.listdir, no stat per file."""
    index = {}
    for name in os.listdir(folder):
        found = pattern.search(name)
        if found:
            index[int(found.group(1))] = name
    return index


def read_json(path, what, fix="", error=UserError):
    """The JSON value in path; ``error`` naming ``what`` (e.g. "data.vocab_json =") and path when the file
    is missing or not JSON, followed by ``fix`` (what to do about it)."""
    name = f"{what} {path}".strip()
    suffix = f"; {fix}" if fix else ""
    if not os.path.isfile(path):
        raise error(f"{name} does not exist{suffix}")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{name} is not valid JSON ({err}){suffix}") from None


def write_text_atomic(path, text):
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w") as handle:
        handle.write(text)
    os.replace(tmp_path, path)


def write_json_atomic(path, data, indent=1):
    write_text_atomic(path, json.dumps(data, indent=indent))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive lock (flock) on ``path``, which names its holder while it is held.

    A second process gets ``error`` saying that ``what`` is in use by ``user`` (which process), and ``advice``. The lock
    dies with its process; a holder line left by a process that is gone is taken over with a note.
    """

    def __init__(self, path, what, user, advice, error=UserError):
        self.path, self.what, self.user, self.advice, self.error = path, what, user, advice, error
        self._handle = None

    def acquire(self):
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):  # e.g. some network file systems
                print(f"note: this file system cannot lock {self.path}; make sure no other process uses "
                      f"{self.what} meanwhile")
            else:
                handle.seek(0)
                holder = handle.read().strip() or "a process that has not written its id yet"
                handle.close()
                raise self.error(f"{self.what} is in use by {self.user} ({holder}); {self.advice}") from None
        handle.seek(0)
        previous = re.match(r"process (\d+)", handle.read())
        if previous and int(previous.group(1)) != os.getpid():
            state = "which no longer runs" if not _pid_alive(int(previous.group(1))) else "which let go of it"
            print(f"note: {self.path} was left by process {previous.group(1)}, {state}; taking it over")
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self):
        if self._handle is not None:
            os.remove(self.path)  # before unlocking: a process that starts now finds no stale holder
            self._handle.close()
            self._handle = None
