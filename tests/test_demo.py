"""The demo pipeline end to end at a tiny scale (the real demo is `make demo`)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.snippets
def test_demo_runs_every_stage_and_skips_them_the_second_time(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--workdir", str(tmp_path),
               "--num_scenes", "45", "--max_iter", "2", "--no_visdom"]  # 38 training ids for a batch of 32
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    experiment = tmp_path / "experiments" / "demo"
    for path in ("snapshots/demo_checkpoint_2.pt", "test_output/captions/test/sc_results.json",
                 "test_output/captions/eval_results.json", "eval_sents/eval_results.json",
                 "report/report.html", "report/report.md"):
        assert (experiment / path).exists(), path
    assert "== time per stage" in first.stdout and "== test split scores" in first.stdout
    test_scores = json.loads((experiment / "test_output/captions/eval_results.json").read_text())
    assert "test" in test_scores["folders"]

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:]
    assert second.stdout.count("already there: skipped") >= 9


def test_features_from_other_settings_stop_the_demo(tmp_path):
    from utils.errors import UserError
    from utils.synthetic_data import FEATURE_ARGS, check_feature_settings

    settings = {"extract_features": list(FEATURE_ARGS), "weights": "random"}
    check_feature_settings(str(tmp_path), settings, "make clean-demo")  # nothing there yet: stamped
    assert json.loads((tmp_path / "feature_settings.json").read_text()) == settings
    check_feature_settings(str(tmp_path), settings, "make clean-demo")  # same settings: goes on

    with pytest.raises(UserError, match="make clean-demo"):
        check_feature_settings(str(tmp_path), dict(settings, weights="imagenet"), "make clean-demo")
    os.remove(tmp_path / "feature_settings.json")
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "CLEVR_default_000000.png.npy").write_bytes(b"")
    with pytest.raises(UserError, match="other settings"):  # features of an older checkout, no stamp
        check_feature_settings(str(tmp_path), settings, "make clean-demo")
