"""Starting and stopping the visdom servers the project runs itself (the demo, the offline check, tests).

They listen on 127.0.0.1 only: -bind_local makes tornado listen there (--hostname alone changes
only the address visdom prints).
"""
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from utils.errors import UserError


class VisdomServerError(UserError):
    """A visdom server that did not start or answer; the message says what happened."""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port, env_path, log_file):
    """Start `python -m visdom.server` on 127.0.0.1:port; returns the Popen (the caller stops it)."""
    cmd = [sys.executable, "-m", "visdom.server", "-port", str(port), "--hostname", "127.0.0.1",
           "-bind_local", "-env_path", env_path]
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def stop_server(proc):
    """Stop a server from start_server: terminate, and kill it if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_index(port, proc, timeout=30.0):
    """Poll the index page until it answers; returns the HTTP status (VisdomServerError on timeout)."""
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VisdomServerError(f"the visdom server exited with code {proc.returncode} before "
                                    f"answering on {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            time.sleep(0.2)
    raise VisdomServerError(f"the visdom server did not answer on {url} within {timeout:.0f} s")
