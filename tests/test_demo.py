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
    assert "right_object_rate" in first.stdout
    test_scores = json.loads((experiment / "test_output/captions/eval_results.json").read_text())
    assert "test" in test_scores["folders"]

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:]
    assert second.stdout.count("already there: skipped") >= 9


def test_features_from_other_settings_stop_the_demo(tmp_path):
    from configs.defaults import load_config
    from utils.errors import UserError
    from utils.extraction import STAMP, settings_from_config
    from utils.synthetic_data import DEMO_CONFIG, check_feature_settings

    settings = settings_from_config(load_config(DEMO_CONFIG).data.extraction)
    check_feature_settings(str(tmp_path), "make clean-demo")  # nothing there yet
    features = tmp_path / "features"
    features.mkdir()
    (features / "CLEVR_default_000000.png.npy").write_bytes(b"")
    with pytest.raises(UserError, match="other settings .*no extraction.json.*make clean-demo"):  # an older checkout
        check_feature_settings(str(tmp_path), "make clean-demo")
    (features / STAMP).write_text(json.dumps(settings))
    check_feature_settings(str(tmp_path), "make clean-demo")  # the demo's settings: goes on
    (features / STAMP).write_text(json.dumps(dict(settings, weights="imagenet")))
    with pytest.raises(UserError, match="imagenet weights.*the demo uses resnet101 layer1"):
        check_feature_settings(str(tmp_path), "make clean-demo")


def test_ctrl_c_in_a_stage_waits_for_it_and_says_how_to_go_on(capsys, tmp_path, monkeypatch):
    import sys

    from scripts import demo

    # The stage gets the Ctrl-C as the demo does (here: it sends it to the demo), then takes a moment to
    # save and exits with 130, as train.py does; the demo waits for it instead of killing it.
    stage = ("import os, signal, time; os.kill(os.getppid(), signal.SIGINT); time.sleep(1); "
             "open(os.environ['SAVED'], 'w').close(); raise SystemExit(130)")
    monkeypatch.setenv("SAVED", str(tmp_path / "saved"))
    with pytest.raises(SystemExit) as stop:
        demo.run([sys.executable, "-c", stage], "train")
    assert stop.value.code == 130 and (tmp_path / "saved").exists()
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C during stage 'train'" in err and "Run `make demo` again to go on" in err
    assert "failed" not in err
