"""The dashboard as a person sees it: a headless Chromium renders the visdom page.

Slow (installs Chromium when missing, starts a browser): run with `pytest -m slow`.
The screenshot is kept in tests/artifacts/dashboard.png for a look by eye.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from utils.logger import Dashboard

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EXPERIMENT = "SCORER+CBR"  # the default experiment name; visdom reads '+' in a URL specially


def _chromium():
    """Path of a Chromium binary, installing the Debian package when missing."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("Chromium is not installed and cannot be installed here (needs apt-get as "
                    "root); install it with `apt-get install chromium`")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if proc.returncode != 0:
            pytest.skip(f"installing Chromium failed ({' '.join(cmd)}): {proc.stderr[-500:]}")
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("apt-get installed the chromium package but no chromium binary is on PATH")
    return path


def _run_chromium(binary, url, *extra):
    with tempfile.TemporaryDirectory(prefix="chromium_profile_") as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               "--window-size=1400,1000", "--virtual-time-budget=15000", *extra, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_dashboard_renders_in_a_browser(visdom_server):
    binary = _chromium()
    dash = Dashboard(True, visdom_server.server, visdom_server.port, EXPERIMENT)
    assert dash.env == "SCORER-CBR"
    for it in range(0, 201, 20):
        dash.scalars(it, {"caption": 3.0 * 0.99 ** it, "cross_view": 1.0 * 0.995 ** it,
                          "cross_modal": 2.0 * 0.997 ** it, "total": 3.3 * 0.99 ** it},
                     "loss", title="training losses")
        dash.scalars(it, {"lr": 2.0e-4 if it < 100 else 2.0e-5}, "lr", title="learning rate",
                     log_y=True)
    dash.scalars(100, {"BLEU-4": 0.31, "CIDEr": 0.95}, "val", title="validation scores")
    dash.scalars(200, {"BLEU-4": 0.42, "CIDEr": 1.21}, "val", title="validation scores")
    dash.captions(200, [("000123.png", "the red cube is missing",
                         ["the red cube is gone", "the large red metal cube has disappeared"]),
                        ("000123.png_n", "nothing has changed",
                         ["the scene remains the same", "no change was made"])])
    assert dash.enabled
    dash.close()

    url = dash.url
    assert url == f"http://127.0.0.1:{visdom_server.port}/env/SCORER-CBR"
    dom = _run_chromium(binary, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for title in ("training losses", "learning rate", "validation scores"):
        assert title in html, f"window '{title}' is not on the page"
    assert "main-svg" in html, "no plotly figure was drawn"
    assert html.count("class=\"scatterlayer") >= 3, "expected three line plots"
    assert "the red cube is missing" in html, "the caption pane is not on the page"

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # screenshots are not source
    shot = ARTIFACTS / "dashboard.png"
    if shot.exists():
        shot.unlink()
    result = _run_chromium(binary, url, f"--screenshot={shot}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
