"""The training dashboard against a real visdom server, and without one."""
import json
import time
import warnings

import pytest
import visdom

from utils.visdom_server import free_port
from utils.logger import Dashboard, visdom_env_name


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
