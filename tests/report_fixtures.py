"""A tiny trained, tested and evaluated experiment for the figure and report tests.

Import it with ``from tests.report_fixtures import tiny_experiment``. It trains the small model
for 2 iterations on ``tiny_data``, captions the test split and scores it with evaluate.py. The
experiment is built once per test session even though two test modules import the fixture.
"""
import json
import os

import pytest

from tests.conftest import tiny_cfg

SMALL_MODEL = {"model.change_detector.att_dim": 32, "model.change_detector.emb_dim": 32,
               "model.speaker.att_dim": 32, "model.speaker.word_dim": 16, "model.cbr.att_dim": 32}
ITERATION = 2
_BUILT = {}


def _build(tiny_data, root):
    import evaluate
    import test as test_script
    import train

    cfg = tiny_cfg(tiny_data, exp_dir=str(root), exp_name="tiny", **SMALL_MODEL,
                   **{"train.max_iter": ITERATION, "train.snapshot_interval": ITERATION,
                      "train.log_interval": 1})
    train.do_train(cfg)
    out_dir = test_script.run_test(cfg, ITERATION)
    captions_dir = os.path.dirname(out_dir)
    assert evaluate.main(["--results_dir", captions_dir, "--anno", tiny_data["anno"],
                          "--type_file", tiny_data["type_mapping"]]) == 0
    with open(os.path.join(out_dir, "sc_results.json")) as handle:
        sc = {r["image_id"]: r["caption"] for r in json.load(handle)}
    with open(os.path.join(out_dir, "nsc_results.json")) as handle:
        nsc = {r["image_id"]: r["caption"] for r in json.load(handle)}
    return {"cfg": cfg, "exp_root": os.path.join(str(root), "tiny"), "iteration": ITERATION,
            "sc": sc, "nsc": nsc, "data": tiny_data}


@pytest.fixture(scope="session")
def tiny_experiment(tiny_data, tmp_path_factory):
    """{"cfg", "exp_root", "iteration", "sc", "nsc" (test captions by image id), "data"}; read-only."""
    if "experiment" not in _BUILT:
        _BUILT["experiment"] = _build(tiny_data, tmp_path_factory.mktemp("tiny_experiment"))
    return _BUILT["experiment"]
