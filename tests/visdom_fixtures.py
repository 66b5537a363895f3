"""A real visdom server for tests, started on a free local port.

Import it into a test module with ``from tests.visdom_fixtures import visdom_server``. The
server's static files are installed first when missing (scripts/setup_visdom_offline.py), so
the fixture works without internet access.
"""
import shutil
from types import SimpleNamespace

import pytest

from scripts import setup_visdom_offline as offline


@pytest.fixture(scope="session")
def visdom_server(tmp_path_factory):
    """Yields SimpleNamespace(server="http://127.0.0.1", port=..., env_path=...)."""
    static_dir, version = offline.visdom_static_dir()
    if not offline.is_complete(static_dir, version):
        if shutil.which("npm") is None:
            pytest.skip("visdom's static files are missing and npm is not installed to fetch "
                        "them; run `python scripts/setup_visdom_offline.py` on a machine with npm")
        offline.install()
    env_path = tmp_path_factory.mktemp("visdom_env")
    port = offline.free_port()
    log_path = env_path.parent / f"visdom_server_{port}.log"
    with open(log_path, "w") as log:
        proc = offline.start_server(port, str(env_path), log)
    try:
        status = offline.wait_for_index(port, proc)
        assert status == 200, f"visdom index page answered {status}; see {log_path}"
        yield SimpleNamespace(server="http://127.0.0.1", port=port, env_path=env_path,
                              log_path=log_path)
    finally:
        offline.stop_server(proc)
