"""End to end on tiny generated data: train, snapshot, resume, test, evaluate."""
import json
import os

import pytest
import torch

import evaluate
import test as test_script
import train
from models import training
from tests.helpers import SMALL_MODEL, tiny_cfg
from utils.checkpoint import list_snapshots, load_snapshot, snapshot_path

pytestmark = pytest.mark.snippets  # trains the model


def weights(path):
    snapshot = load_snapshot(path)
    return {f"{part}.{k}": v for part in ("change_detector_state", "speaker_state", "cbr_state")
            for k, v in snapshot[part].items()}


def train_losses(cfg):
    with open(os.path.join(cfg.exp_dir, cfg.exp_name, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle if '"train"' in line]


def test_train_snapshot_test_evaluate(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, exp_dir=str(tmp_path), exp_name="e2e", **SMALL_MODEL)
    last = train.do_train(cfg)
    assert last == snapshot_path(cfg, 4)
    assert list_snapshots(cfg) == [2, 4]
    exp_root = tmp_path / "e2e"
    snapshot = load_snapshot(last)
    assert snapshot["iteration"] == 4 and snapshot["vocab"]["<END>"] == 3
    assert snapshot["config"]["model"]["speaker"]["att_dim"] == 32
    for iteration in (2, 4):
        for name in ("sc_results.json", "nsc_results.json"):
            results = json.loads((exp_root / "eval_sents" / f"e2e_sents_{iteration}" / name).read_text())
            assert results and all(set(r) == {"image_id", "caption"} for r in results)
    best = json.loads((exp_root / "best_snapshot.json").read_text())
    assert best["iteration"] in (2, 4) and "CIDEr" in best
    assert (exp_root / "train_log.txt").read_text().count("val BLEU-4") == 2

    out_dir = test_script.run_test(cfg, 4)
    sc = json.loads(open(os.path.join(out_dir, "sc_results.json")).read())
    nsc = json.loads(open(os.path.join(out_dir, "nsc_results.json")).read())
    test_ids = json.load(open(tiny_data["splits"]))["test"]
    assert sorted(r["image_id"] for r in sc) == sorted(f"{i:06d}.png" for i in test_ids)
    assert all(r["image_id"].endswith(".png_n") for r in nsc)

    evaluate.main(["--results_dir", str(exp_root / "test_output" / "captions"), "--anno", tiny_data["anno"],
                   "--type_file", tiny_data["type_mapping"]])
    assert (exp_root / "test_output" / "captions" / "eval_results.json").exists()


def test_resume_gives_identical_weights_and_losses(tiny_data, tmp_path):
    # 3 iterations an epoch (12 train ids / batch 4): the split also crosses an epoch boundary.
    common = dict(exp_dir=str(tmp_path), **SMALL_MODEL, **{"train.max_iter": 8, "train.snapshot_interval": 4,
                                                         "train.log_interval": 1, "train.optim.step_size": 1})
    straight = tiny_cfg(tiny_data, exp_name="straight", **common)
    train.do_train(straight)
    resumed = tiny_cfg(tiny_data, exp_name="resumed", **{**common, "train.max_iter": 4})
    train.do_train(resumed)
    resumed = tiny_cfg(tiny_data, exp_name="resumed", **common)
    train.do_train(resumed, resume=True, accept_changes=True)  # max_iter 4 -> 8

    a, b = weights(snapshot_path(straight, 8)), weights(snapshot_path(resumed, 8))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses_a = [(r["iteration"], r["total"]) for r in train_losses(straight)]
    losses_b = [(r["iteration"], r["total"]) for r in train_losses(resumed)]
    assert losses_a == losses_b and len(losses_a) == 8
    lr = [r["lr"] for r in train_losses(resumed)]
    assert lr[-1] < lr[0]  # the per-epoch schedule went on across the resume


def test_missing_snapshot_lists_the_ones_that_exist(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, exp_dir=str(tmp_path), exp_name="few", **SMALL_MODEL,
                   **{"train.max_iter": 2, "train.snapshot_interval": 2})
    train.do_train(cfg)
    with pytest.raises(Exception, match=r"no snapshot for iteration 7.*available: 2"):
        test_script.run_test(cfg, 7)


def overflowing_model(monkeypatch, at_calls):
    """The CaptionModel of models/training.py, whose training loss is multiplied by 1e37 at the given forward calls (counted from 1):
    finite, but its fp16 loss scale of 65536 makes the gradients overflow. Returns the call counter."""
    calls = [0]

    class Overflowing(training.CaptionModel):
        def forward(self, *args, **kwargs):
            losses = super().forward(*args, **kwargs)
            calls[0] += 1
            if calls[0] in at_calls:
                losses["total"] = losses["total"] * 1e37
            return losses

    monkeypatch.setattr(training, "CaptionModel", Overflowing)
    return calls


FP16 = dict(**SMALL_MODEL, **{"train.amp": "fp16", "train.log_interval": 1})


def test_fp16_scaler_on_the_cpu_changes_nothing_in_float32(tiny_data, tmp_path):
    # Loss scaling by a power of two, unscaled before the step, is exact: the same weights as without it.
    common = dict(exp_dir=str(tmp_path), **SMALL_MODEL, **{"train.max_iter": 2, "train.snapshot_interval": 2})
    plain = tiny_cfg(tiny_data, exp_name="plain", **common)
    scaled = tiny_cfg(tiny_data, exp_name="scaled", **common, **{"train.amp": "fp16"})
    train.do_train(plain)
    train.do_train(scaled)
    a, b = weights(snapshot_path(plain, 2)), weights(snapshot_path(scaled, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_snapshot(snapshot_path(scaled, 2))["scaler_state"]["scale"] == 65536.0
    assert load_snapshot(snapshot_path(plain, 2))["scaler_state"] == {}


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_is_logged(tiny_data, tmp_path, monkeypatch):
    overflowing_model(monkeypatch, at_calls={2})
    cfg = tiny_cfg(tiny_data, exp_dir=str(tmp_path), exp_name="overflow",
                   **{**FP16, "train.max_iter": 3, "train.snapshot_interval": 1})
    train.do_train(cfg)
    one, two, three = (load_snapshot(snapshot_path(cfg, i)) for i in (1, 2, 3))
    w1, w2, w3 = (weights(snapshot_path(cfg, i)) for i in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # step 2 overflowed: no update
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # step 3 trained again
    assert [s["scaler_state"]["scale"] for s in (one, two, three)] == [65536.0, 32768.0, 32768.0]
    assert [s["overflow_skips"] for s in (one, two, three)] == [0, 1, 1]
    records = train_losses(cfg)
    assert [(r["iteration"], r["loss_scale"], r["overflow_skips"]) for r in records] == \
        [(1, 65536.0, 0), (2, 32768.0, 1), (3, 32768.0, 1)]
    log = (tmp_path / "overflow" / "train_log.txt").read_text()
    assert "iter 2:" in log and "loss scale 32768 (1 steps skipped on fp16 overflow)" in log


def test_fp16_run_stopped_and_resumed_keeps_its_scale(tiny_data, tmp_path, monkeypatch):
    common = dict(exp_dir=str(tmp_path), **{**FP16, "train.max_iter": 4, "train.snapshot_interval": 2})
    calls = overflowing_model(monkeypatch, at_calls={1})
    straight = tiny_cfg(tiny_data, exp_name="straight", **common)
    train.do_train(straight)
    calls[0] = 0
    first = tiny_cfg(tiny_data, exp_name="resumed", **{**common, "train.max_iter": 2})
    train.do_train(first)
    resumed = tiny_cfg(tiny_data, exp_name="resumed", **common)
    train.do_train(resumed, resume=True, accept_changes=True)  # max_iter 2 -> 4
    a, b = (load_snapshot(snapshot_path(c, 4)) for c in (straight, resumed))
    assert a["scaler_state"] == b["scaler_state"] and a["scaler_state"]["scale"] == 32768.0
    assert a["scaler_state"]["_growth_tracker"] == 3 and b["overflow_skips"] == 1
    wa, wb = weights(snapshot_path(straight, 4)), weights(snapshot_path(resumed, 4))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
