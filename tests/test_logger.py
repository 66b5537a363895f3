"""The training dashboard against a real visdom server, without one, and with something else on its port;
the visdom servers the project starts listen on 127.0.0.1 only."""
import io
import json
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest
import visdom

import train
from tests.helpers import FAST, tiny_cfg
from utils.checkpoint import snapshot_path
from utils.logger import Dashboard, visdom_env_name
from utils.visdom_server import free_port


def _window(server, env, win):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # visdom's own Logger.warn call
        client = visdom.Visdom(server=server.server, port=server.port, env=env,
                               use_incoming_socket=False, raise_exceptions=True)
    data = client.get_window_data(win, env)
    assert data, f"window {win} not found in env {env}"
    return json.loads(data)


def _traces(window):
    return {trace["name"]: (trace["x"], trace["y"]) for trace in window["content"]["data"]}


def test_dashboard_logs_scalars_and_captions(visdom_server):
    env = "test_dashboard"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a working server: no warning
        dash = Dashboard(True, visdom_server.server, visdom_server.port, env)
        assert dash.enabled
        for it in (20, 40, 60):
            dash.scalars(it, {"caption": 3.0 - it / 100, "cross_view": 1.5, "total": it / 10},
                         "loss", title="losses")
        dash.scalars(20, {"lr": 2.0e-4}, "lr", log_y=True)
        dash.scalars(20, {"BLEU-4": 0.25, "CIDEr": 0.9}, "val")
        # A new key in an existing window becomes a new trace.
        dash.scalars(40, {"BLEU-4": 0.30, "CIDEr": 1.1, "METEOR": 0.2}, "val")
        dash.captions(60, [("000123.png", "the red cube is missing",
                            ["the red cube is gone", "the red <b>cube</b> is missing"])])
        dash.close()
    assert not dash.enabled

    loss = _window(visdom_server, env, "loss")
    assert loss["title"] == "losses"
    traces = _traces(loss)
    assert set(traces) == {"caption", "cross_view", "total"}
    assert traces["caption"] == ([20, 40, 60], [pytest.approx(2.8), pytest.approx(2.6),
                                                pytest.approx(2.4)])
    assert traces["total"][1] == [pytest.approx(2.0), pytest.approx(4.0), pytest.approx(6.0)]

    lr = _window(visdom_server, env, "lr")
    assert lr["content"]["layout"]["yaxis"]["type"] == "log"
    assert _window(visdom_server, env, "loss")["content"]["layout"]["yaxis"]["type"] == "linear"

    val = _traces(_window(visdom_server, env, "val"))
    assert val["BLEU-4"] == ([20, 40], [pytest.approx(0.25), pytest.approx(0.30)])
    assert val["METEOR"] == ([40], [pytest.approx(0.2)])

    pane = _window(visdom_server, env, "captions")
    text = pane["content"]
    assert "000123.png" in text and "the red cube is missing" in text
    assert "&lt;b&gt;cube&lt;/b&gt;" in text  # captions are escaped, not rendered as HTML
    # close() saved the environment to the server's env_path.
    assert (visdom_server.env_path / f"{env}.json").is_file()


def test_dashboard_recreates_windows_on_a_new_run(visdom_server):
    env = "test_dashboard_rerun"
    first = Dashboard(True, visdom_server.server, visdom_server.port, env)
    first.scalars(1, {"lr": 2.0e-4}, "lr")
    first.scalars(2, {"lr": 2.0e-4}, "lr")
    second = Dashboard(True, visdom_server.server, visdom_server.port, env)
    second.scalars(1, {"lr": 1.0e-4}, "lr")
    assert _traces(_window(visdom_server, env, "lr"))["lr"] == ([1], [pytest.approx(1.0e-4)])


def test_dashboard_without_server_warns_once_and_is_fast():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="visdom dashboard disabled") as record:
        dash = Dashboard(True, "http://127.0.0.1", port, "nowhere")
        for it in range(200):
            dash.scalars(it, {"total": 1.0}, "loss")
        dash.captions(200, [("000001.png", "nothing has changed", ["no change was made"])])
        dash.close()
    elapsed = time.monotonic() - start
    assert len(record) == 1
    assert not dash.enabled
    assert elapsed < 2.0, f"a dashboard without server took {elapsed:.2f} s"


def test_disabled_dashboard_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dash = Dashboard(False, "http://127.0.0.1", free_port(), "off")
        dash.scalars(1, {"total": 1.0}, "loss")
        dash.captions(1, [])
        dash.close()
    assert not dash.enabled


def test_env_names_are_safe_for_visdom():
    assert visdom_env_name("SCORER+CBR") == "SCORER-CBR"
    assert visdom_env_name("run_1.b-2") == "run_1.b-2"
    assert visdom_env_name("a/b c") == "a-b-c"
    assert Dashboard(False, "http://127.0.0.1", 1, "SCORER+CBR").env == "SCORER-CBR"


class _BusyPort:
    """A TCP port held by something that is not visdom: it accepts connections and hangs up."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self

    def _serve(self):
        while not self.stop:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            connection.close()

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.mark.snippets
def test_busy_visdom_port_warns_and_training_goes_on(tiny_data, tmp_path):
    with _BusyPort() as busy:
        cfg = tiny_cfg(tiny_data, exp_dir=str(tmp_path), exp_name="busy",
                       **{**FAST, "logger.visdom": True, "logger.port": busy.port, "train.max_iter": 1,
                          "train.snapshot_interval": 1})
        with pytest.warns(RuntimeWarning, match="visdom dashboard disabled: .*Training continues without it"):
            assert train.do_train(cfg) == snapshot_path(cfg, 1)


# ------------------------------------------------------------------ 6. visdom listens on localhost
def visdom_server_options(cmd, monkeypatch):
    """The keyword arguments visdom 0.2.4's own command line makes of ``cmd`` (python -m visdom.server ...)."""
    import logging

    from visdom.server import run_server

    assert cmd[1:3] == ["-m", "visdom.server"], cmd
    started = {}
    monkeypatch.setattr(run_server, "start_server", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(sys, "argv", ["visdom.server", *cmd[3:]])
    level = logging.getLogger().level
    try:
        run_server.main()
    except SystemExit as exit_:  # argparse rejected the command
        pytest.fail(f"visdom.server rejects {cmd[3:]} (exit {exit_.code})")
    finally:
        logging.getLogger().setLevel(level)
    return started


@pytest.mark.parametrize("starter", ["scripts/demo.py", "utils/visdom_server.py"])
def test_visdom_servers_started_by_the_project_listen_on_localhost_only(starter, tmp_path, monkeypatch):
    from scripts import demo
    from utils import visdom_server

    commands = []

    class Recorder:
        def __init__(self, cmd, **kwargs):
            commands.append(list(cmd))

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    if starter == "scripts/demo.py":
        monkeypatch.setattr(demo, "open", lambda *args, **kwargs: io.StringIO(), raising=False)  # its log
        monkeypatch.setattr(demo, "run", lambda command, stage: None)
        monkeypatch.setattr(demo, "port_open", lambda port: False)  # nothing on the port before the start
        monkeypatch.setattr(demo, "wait_for_index", lambda port, server: 200)
        demo.start_visdom(8097, str(tmp_path))
    else:
        visdom_server.start_server(8097, str(tmp_path), None)
    [cmd] = commands
    # --hostname only changes the address visdom prints; -bind_local makes it listen on 127.0.0.1
    # (without it tornado listens on every interface).
    assert visdom_server_options(cmd, monkeypatch)["bind_local"] is True, f"{starter}: {cmd}"
