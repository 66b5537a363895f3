"""Fault injection: what a careless or hostile user can do to a run, and what the project does about it.

Each test makes one fault and checks the exit status (2 with one `error:` line naming the file or key
and the fix, 130 after a stop), the message, and that what was written earlier is intact.
Checked elsewhere: broken, foreign, truncated and pickled-code snapshots and a full disk while saving
(tests/test_checkpoint.py); missing data files and folders (tests/test_dataset.py); results folders
evaluate.py cannot use (tests/test_evaluate.py); no visdom server, or something else on its port
(tests/test_logger.py).
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import train
from configs.defaults import ConfigError, load_config
from models.captioner import CaptionModel
from tests.helpers import FAST, ROOT, assert_cli_error, one_thread_env, run_cli, tiny_cfg, write_cfg
from utils import checkpoint
from utils.checkpoint import list_snapshots, load_snapshot, snapshot_path
from utils.dataset import DataError, RCCDataset
from utils.experiment import Experiment, ExperimentError, read_metrics
from utils.eval_utils import EvalError

pytestmark = pytest.mark.snippets  # nearly every fault needs a run of the model


def fast_cfg(tiny_data, tmp_path, name, **overrides):
    return tiny_cfg(tiny_data, exp_dir=str(tmp_path), exp_name=name, **{**FAST, **overrides})


def weights(path):
    snapshot = load_snapshot(path)
    return {f"{part}.{k}": v for part in ("change_detector_state", "speaker_state", "cbr_state")
            for k, v in snapshot[part].items()}


def same_weights(path_a, path_b):
    a, b = weights(path_a), weights(path_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def folder_state(cfg):
    """{file: bytes} of an experiment folder: to show that nothing written earlier changed."""
    root = os.path.join(cfg.exp_dir, cfg.exp_name)
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                found[os.path.relpath(os.path.join(folder, name), root)] = handle.read()
    return found


def train_cli(cfg, tmp_path, *args, timeout=300):
    return run_cli("train.py", "--cfg", write_cfg(cfg, tmp_path), *args, timeout=timeout)


@pytest.fixture
def finished(tiny_data, tmp_path):
    """A finished 4-iteration run (snapshots 2 and 4) in its own folder."""
    cfg = fast_cfg(tiny_data, tmp_path, "run")
    train.do_train(cfg)
    return cfg


# ------------------------------------------------------------------ experiments are owned
def test_a_second_run_without_resume_stops_and_changes_nothing(finished, tmp_path):
    before = folder_state(finished)
    proc = train_cli(finished, tmp_path)
    assert_cli_error(proc, "already holds snapshots (2, 4)", "--resume", f"exp_name {finished.exp_name}_2",
                     "--overwrite")
    assert folder_state(finished) == before


def test_overwrite_starts_over_and_removes_the_old_outputs(finished, tmp_path):
    root = os.path.join(finished.exp_dir, finished.exp_name)
    os.makedirs(os.path.join(root, "test_output", "captions", "test"))
    proc = train_cli(finished, tmp_path, "--overwrite", "train.max_iter", "2", "--accept_config_changes")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list_snapshots(finished) == [2] and not os.path.exists(os.path.join(root, "test_output"))
    assert json.load(open(os.path.join(root, "best_snapshot.json")))["iteration"] == 2
    assert [r["iteration"] for r in read_metrics(os.path.join(root, "metrics.jsonl"))] == [2, 2]  # train, val


def test_a_run_in_progress_owns_its_folder(tiny_data, tmp_path):
    cfg = fast_cfg(tiny_data, tmp_path, "busy")
    with Experiment(cfg, resuming=False):
        proc = train_cli(cfg, tmp_path)
        assert_cli_error(proc, "is in use by another training run", f"process {os.getpid()}", "another exp_name")
    assert not os.path.exists(os.path.join(tmp_path, "busy", ".lock"))  # released at the end


def test_the_lock_of_a_dead_process_is_taken_over(tiny_data, tmp_path):
    cfg = fast_cfg(tiny_data, tmp_path, "stale", **{"train.max_iter": 1, "train.snapshot_interval": 1})
    os.makedirs(tmp_path / "stale")
    (tmp_path / "stale" / ".lock").write_text("process 2147483000 on elsewhere since 2026-01-01 00:00:00\n")
    proc = train_cli(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "was left by process 2147483000, which no longer runs; taking it over" in proc.stdout


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "", ".", "..", "with space"])
def test_exp_name_is_one_safe_folder_name(tiny_data, tmp_path, name):
    with pytest.raises(ConfigError, match="exp_name .* must be one folder name made of letters, digits"):
        load_config(None, ["exp_name", name])
    proc = run_cli("train.py", "--cfg", write_cfg(tiny_cfg(tiny_data, exp_dir=str(tmp_path / "exp")), tmp_path),
                   "exp_name", name)
    assert_cli_error(proc, "exp_name", "letters, digits")
    assert not os.path.exists(tmp_path / "exp")


# ------------------------------------------------------------------ stops at step boundaries
def test_sigterm_at_random_moments_then_resume_equals_an_uninterrupted_run(tiny_data, tmp_path):
    common = {"train.max_iter": 10, "train.snapshot_interval": 5, "train.log_interval": 1}
    straight = fast_cfg(tiny_data, tmp_path, "straight", **common)
    train.do_train(straight)
    rng = random.Random()
    for trial in range(3):
        cfg = fast_cfg(tiny_data, tmp_path, f"stopped{trial}", **common)
        cfg_file = write_cfg(cfg, tmp_path, f"cfg{trial}.yaml")
        proc = subprocess.Popen([sys.executable, "train.py", "--cfg", cfg_file], cwd=ROOT, env=one_thread_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = os.path.join(cfg.exp_dir, cfg.exp_name, "train_log.txt")
        deadline = time.monotonic() + 120
        while not (os.path.exists(log) and os.path.getsize(log)) and time.monotonic() < deadline:
            time.sleep(0.02)  # the first iteration is done
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        if proc.returncode in (0, -signal.SIGTERM):
            continue  # finished before the signal (or was ending when it came): nothing to resume
        assert proc.returncode == 130, (delay, err[-2000:])
        stopped = int(re.search(r"SIGTERM: stopped at iteration (\d+)", out).group(1))
        assert f"SIGTERM: the state of iteration {stopped} is in {snapshot_path(cfg, stopped)}" in out
        resumed = run_cli("train.py", "--cfg", cfg_file, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert same_weights(snapshot_path(straight, 10), snapshot_path(cfg, 10)), (trial, delay, stopped)
        records = [(r["iteration"], r["split"]) for r in read_metrics(os.path.join(tmp_path, cfg.exp_name, "metrics.jsonl"))]
        assert records == [(r["iteration"], r["split"]) for r in
                           read_metrics(os.path.join(tmp_path, "straight", "metrics.jsonl"))], (trial, stopped)
        assert "Traceback" not in err


def test_ctrl_c_ends_the_step_and_signals_during_the_save_are_ignored(tiny_data, tmp_path, monkeypatch, capsys):
    calls = []
    forward, save = CaptionModel.forward, train.save_snapshot

    def interrupted_at_fourth_batch(self, *args):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the fourth step
        return forward(self, *args)

    def save_under_fire(path, snapshot):
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while the snapshot is written
        os.kill(os.getpid(), signal.SIGINT)
        save(path, snapshot)

    monkeypatch.setattr(CaptionModel, "forward", interrupted_at_fourth_batch)
    monkeypatch.setattr(train, "save_snapshot", save_under_fire)
    cfg = fast_cfg(tiny_data, tmp_path, "ctrlc", **{"train.max_iter": 10, "train.snapshot_interval": 100})
    with pytest.raises(SystemExit) as stop:
        train.do_train(cfg)
    assert stop.value.code == 130
    out = capsys.readouterr().out
    assert "Ctrl-C: stopped at iteration 4" in out  # the fourth step was finished, then saved
    assert "SIGTERM: already stopping; the snapshot is being saved" in out
    assert list_snapshots(cfg) == [4] and load_snapshot(snapshot_path(cfg, 4))["iteration"] == 4


def test_a_validation_cut_short_is_done_when_the_run_resumes(tiny_data, tmp_path, monkeypatch, capsys):
    real = train.generate_captions

    def stopped_during_validation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    cfg = fast_cfg(tiny_data, tmp_path, "val", **{"train.max_iter": 4, "train.snapshot_interval": 2})
    monkeypatch.setattr(train, "generate_captions", stopped_during_validation)
    with pytest.raises(SystemExit):
        train.do_train(cfg)
    metrics = os.path.join(tmp_path, "val", "metrics.jsonl")
    assert list_snapshots(cfg) == [2] and not [r for r in read_metrics(metrics) if r["split"] == "val"]
    monkeypatch.setattr(train, "generate_captions", real)
    train.do_train(cfg, resume=True)
    assert "validating snapshot 2, whose validation did not finish" in capsys.readouterr().out
    assert [(r["iteration"], r["split"]) for r in read_metrics(metrics)] == [(2, "val"), (4, "train"), (4, "val")]


def test_sigkill_at_a_random_moment_leaves_every_snapshot_loadable_and_resume_cleans_up(tiny_data, tmp_path):
    cfg = fast_cfg(tiny_data, tmp_path, "kill", **{"train.max_iter": 100000, "train.snapshot_interval": 1})
    proc = subprocess.Popen([sys.executable, "train.py", "--cfg", write_cfg(cfg, tmp_path)], cwd=ROOT,
                            env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    delay = random.uniform(0.0, 2.0)
    deadline = time.monotonic() + 120
    while not list_snapshots(cfg) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    folder = checkpoint.snapshot_dir(cfg)
    names = sorted(os.listdir(folder))
    snapshots = [name for name in names if name.endswith(".pt")]
    for name in snapshots:
        iteration = int(re.search(r"_checkpoint_(\d+)\.pt$", name).group(1))
        assert load_snapshot(os.path.join(folder, name))["iteration"] == iteration, (delay, name)
    assert all(".pt.tmp." in name for name in set(names) - set(snapshots)), (delay, names)
    # A write the kill cut short leaves a temporary file; the next start removes it.
    (tmp_path / "kill" / "snapshots" / "kill_checkpoint_999.pt.tmp.12345").write_bytes(b"PK")
    last = list_snapshots(cfg)[-1]
    resumed = train_cli(cfg, tmp_path, "--resume", "train.max_iter", str(last + 1), "--accept_config_changes")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "kill_checkpoint_999.pt.tmp.12345, left by a write that was cut short" in resumed.stdout
    assert not [name for name in os.listdir(folder) if ".tmp" in name]


def test_resume_over_a_truncated_newest_snapshot_names_it_and_the_way_back(finished, tmp_path):
    newest = snapshot_path(finished, 4)
    with open(newest, "r+b") as handle:
        handle.truncate(os.path.getsize(newest) // 2)
    proc = train_cli(finished, tmp_path, "--resume")
    assert_cli_error(proc, newest, "it may be truncated", "--resume_from 2")
    proc = train_cli(finished, tmp_path, "--resume_from", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_snapshot(newest)["iteration"] == 4  # trained again from 2


def test_resume_with_changed_training_keys_lists_them_and_asks_for_the_flag(finished, tmp_path):
    before = folder_state(finished)
    proc = train_cli(finished, tmp_path, "--resume", "train.max_iter", "6", "data.train.batch_size", "2")
    assert_cli_error(proc, "data.train.batch_size: 4 -> 2", "train.max_iter: 4 -> 6", "--accept_config_changes")
    assert folder_state(finished) == before
    proc = train_cli(finished, tmp_path, "--resume", "train.max_iter", "6", "--accept_config_changes")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list_snapshots(finished) == [2, 4, 6]
    # The log holds each iteration once, as after an uninterrupted run.
    records = read_metrics(os.path.join(finished.exp_dir, finished.exp_name, "metrics.jsonl"))
    assert [(r["iteration"], r["split"]) for r in records] == [(2, "val"), (4, "train"), (4, "val"), (6, "train"),
                                                               (6, "val")]


# ------------------------------------------------------------------ values checked before work starts
@pytest.mark.parametrize("key, value, rule", [
    ("data.train.batch_size", "0", "[1, inf)"), ("data.train.batch_size", "-4", "[1, inf)"),
    ("train.snapshot_interval", "0", "[1, inf)"), ("train.optim.step_size", "0", "[1, inf)"),
    ("train.max_iter", "0", "[1, inf)"), ("data.train.seq_per_img", "0", "[1, inf)"),
    ("train.optim.lr", "-1e-4", "(0, inf)"), ("data.swap_prob", "1.5", "[0, 1]"),
    ("model.speaker.dropout", "1.0", "[0, 1)"), ("train.optim.betas", "(0.9, 1.0)", "[0, 1)"),
    ("train.optim.lr", "nan", "(0, inf)")])
def test_values_outside_their_range_stop_at_once(tiny_data, tmp_path, key, value, rule):
    cfg = fast_cfg(tiny_data, tmp_path, "range")
    proc = train_cli(cfg, tmp_path, key, value)
    assert_cli_error(proc, key, f"must lie in {rule}", "configs/defaults.py")
    assert not os.path.exists(tmp_path / "range")


def test_every_numeric_key_documents_its_range():
    from configs.defaults import RANGES, get_cfg_defaults

    def numeric_keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from numeric_keys(value, prefix + key + ".")
            elif isinstance(value, (int, float, tuple)) and not isinstance(value, bool):  # the tuples hold numbers
                yield prefix + key

    assert sorted(numeric_keys(get_cfg_defaults())) == sorted(RANGES)


def test_every_tuple_key_documents_its_length_and_wrong_lengths_stop(tiny_data, tmp_path):
    from configs.defaults import LENGTHS, get_cfg_defaults

    def tuple_keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from tuple_keys(value, prefix + key + ".")
            elif isinstance(value, tuple):
                yield prefix + key

    assert sorted(tuple_keys(get_cfg_defaults())) == sorted(LENGTHS)
    cfg = fast_cfg(tiny_data, tmp_path, "length")
    for key, value, rule in (("train.optim.betas", "(0.9,)", "must hold 2 values"),
                             ("data.extraction.image_size", "(224, 224, 3)", "must hold 2 integers"),
                             ("data.extraction.output_grid", "(7.5, 7.5)", "must hold 0 or 2 integers")):
        assert_cli_error(train_cli(cfg, tmp_path, key, value), key, rule, "configs/defaults.py")
    assert not os.path.exists(tmp_path / "length")


def test_a_batch_larger_than_the_split_is_an_error_not_a_smaller_batch(tiny_data, tmp_path):
    proc = train_cli(fast_cfg(tiny_data, tmp_path, "big"), tmp_path, "data.train.batch_size", "64")
    assert_cli_error(proc, "data.train.batch_size (64) is larger than the 34 ids of the train split")


# ------------------------------------------------------------------ files checked when read
def copy_data(tiny_data, tmp_path, *keys):
    """tiny_data with writable copies of the given entries."""
    import shutil

    paths = dict(tiny_data)
    for key in keys:
        target = str(tmp_path / "data" / os.path.basename(tiny_data[key]))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        (shutil.copytree if os.path.isdir(tiny_data[key]) else shutil.copy)(tiny_data[key], target)
        paths[key] = target
    return paths


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_nan_in_a_feature_file_names_the_file(tiny_data, tmp_path, split):
    paths = copy_data(tiny_data, tmp_path, "sc_features")
    cfg = tiny_cfg(paths, exp_dir=str(tmp_path / "exp"), exp_name="nan", **FAST)
    scene = RCCDataset(cfg, split).ids[0]
    bad = os.path.join(paths["sc_features"], "CLEVR_semantic_%06d.png.npy" % scene)
    array = np.load(bad)
    array[0, 0, 0] = np.nan
    np.save(bad, array)
    if split == "train":
        proc = train_cli(cfg, tmp_path, "data.in_memory", "True")
    else:
        trained = tiny_cfg(tiny_data, exp_dir=str(tmp_path / "exp"), exp_name="nan", **FAST,
                           **{"train.max_iter": 1, "train.snapshot_interval": 1})
        train.do_train(trained)
        proc = run_cli("test.py", "--cfg", write_cfg(cfg, tmp_path), "--snapshot", "1")
    assert_cli_error(proc, f"feature file {bad} holds NaN or Inf values", "re-run scripts/extract_features.py")


def _edit_json(path, change):
    with open(path) as handle:
        data = json.load(handle)
    change(data)
    with open(path, "w") as handle:
        json.dump(data, handle)


@pytest.mark.parametrize("case, key, change, message", [
    ("an id twice in a split", "splits", lambda s: s["train"].append(s["train"][0]),
     "split 'train' lists 1 id(s) twice"),
    ("an id in two splits", "splits", lambda s: s["val"].append(s["train"][0]), "are in both 'train' and 'val'"),
    ("a word index used twice", "vocab", lambda v: v.update(extra=v["cube"]), "index {cube} belongs to both 'cube' and 'extra'"),
    ("a special token moved", "vocab", lambda v: v.update({"<END>": 99}), "<END> must have index 3"),
])
def test_inconsistent_split_and_vocabulary_files_stop_before_training(tiny_data, tmp_path, case, key, change, message):
    paths = copy_data(tiny_data, tmp_path, key)
    with open(paths["vocab"]) as handle:
        message = message.format(cube=json.load(handle)["cube"])
    _edit_json(paths[key], change)
    proc = train_cli(tiny_cfg(paths, exp_dir=str(tmp_path / "exp"), **FAST), tmp_path)
    assert_cli_error(proc, paths[key], message)
    assert not os.path.exists(tmp_path / "exp")


def test_label_ids_outside_the_vocabulary(tiny_data, tmp_path):
    paths = copy_data(tiny_data, tmp_path, "h5")
    with h5py.File(paths["h5"], "a") as handle:
        labels = handle["labels"][()]
        labels[0, 1] = 500
        handle["labels"][...] = labels
    with pytest.raises(DataError, match=r"labels hold word id 500, outside the 76 words .*rebuild both"):
        RCCDataset(tiny_cfg(paths), "val")


@pytest.mark.parametrize("captions, message", [
    (None, "the captions of CLEVR_default_000000.png (scene id 0) must be a list of strings, got null"),
    (["the cube moved", None], "must be a list of strings"),
    ([], "has an empty caption list")])
def test_preprocessing_names_a_caption_that_is_not_text(tiny_data, tmp_path, captions, message):
    paths = copy_data(tiny_data, tmp_path, "change_captions")
    _edit_json(paths["change_captions"], lambda c: c.update({"CLEVR_default_000000.png": captions}))
    proc = run_cli("scripts/preprocess_captions_transformer.py", "--input_captions_json", paths["change_captions"],
                   "--input_neg_captions_json", paths["no_change_captions"], "--input_image_dir", paths["images"],
                   "--split_json", paths["splits"], "--output_vocab_json", tmp_path / "v.json",
                   "--output_h5", tmp_path / "l.h5")
    assert_cli_error(proc, paths["change_captions"], message)
    assert not os.path.exists(tmp_path / "l.h5")


def test_too_little_disk_space_stops_before_training(tiny_data, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    cfg = fast_cfg(tiny_data, tmp_path, "full")
    with pytest.raises(ExperimentError, match=f"only 0 MiB free in {tmp_path}/full, and a snapshot needs about"):
        train.do_train(cfg)
    assert not list_snapshots(cfg)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_earlier_snapshot(tiny_data, tmp_path, monkeypatch):
    real = torch.save

    def fill_up(obj, handle, *args, **kwargs):
        if "_checkpoint_4.pt" in getattr(handle, "name", ""):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed "
                               "writing file data/3: file write failed")
        return real(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", fill_up)
    cfg = fast_cfg(tiny_data, tmp_path, "disk")
    with pytest.raises(checkpoint.SnapshotError, match="no space left in .*disk_checkpoint_4.pt.*continue with --resume"):
        train.do_train(cfg)
    assert list_snapshots(cfg) == [2] and load_snapshot(snapshot_path(cfg, 2))["iteration"] == 2


# ------------------------------------------------------------------ losses, outputs, devices
def nan_loss_at(calls_wanted, monkeypatch, compute=True):
    """Makes CaptionModel.forward return a NaN caption loss at the given call numbers (1-based)."""
    calls = []
    forward = CaptionModel.forward

    def patched(self, batch, lambda_v, lambda_m):
        calls.append(1)
        if not compute:
            nan = torch.tensor(float("nan"))
            return {"total": nan, "caption": nan, "cross_view": torch.tensor(1.0), "cross_modal": torch.tensor(1.0)}
        losses = forward(self, batch, lambda_v, lambda_m)
        if len(calls) in calls_wanted:
            nan = torch.tensor(float("nan"))
            losses = {**losses, "caption": losses["caption"] * nan, "total": losses["total"] * nan}
        return losses

    monkeypatch.setattr(CaptionModel, "forward", patched)
    return calls


def test_nonfinite_loss_stops_with_the_iteration_and_keeps_the_last_snapshot(tiny_data, tmp_path, monkeypatch):
    nan_loss_at({3}, monkeypatch)
    cfg = fast_cfg(tiny_data, tmp_path, "nan", **{"train.max_iter": 6, "train.snapshot_interval": 2})
    with pytest.raises(train.TrainingError, match=r"non-finite loss at iteration 3 \(total nan, caption nan, "
                                                  r"cross_view [0-9.]+, cross_modal [0-9.]+\); the last good "
                                                  r"snapshot is kept.*on_nonfinite_loss skip.*NaN/Inf"):
        train.do_train(cfg)
    assert list_snapshots(cfg) == [2]


def test_nonfinite_loss_skip_drops_the_batch_and_resumes_exactly(tiny_data, tmp_path, monkeypatch, capsys):
    calls = nan_loss_at({3}, monkeypatch)
    cfg = fast_cfg(tiny_data, tmp_path, "skip", **{"train.max_iter": 4, "train.snapshot_interval": 4,
                                                   "train.on_nonfinite_loss": "skip"})
    assert train.do_train(cfg) == snapshot_path(cfg, 4)
    assert len(calls) == 5
    assert re.search(r"non-finite loss at iteration 3 \(total nan, caption nan, .*\); batch skipped",
                     capsys.readouterr().out)
    snapshot = load_snapshot(snapshot_path(cfg, 4))
    assert snapshot["data_position"] == 5 and all(torch.isfinite(v).all() for v in snapshot["speaker_state"].values())


def test_skip_gives_up_after_an_epoch_of_nonfinite_losses(tiny_data, tmp_path, monkeypatch):
    calls = nan_loss_at(set(), monkeypatch, compute=False)
    cfg = fast_cfg(tiny_data, tmp_path, "allnan", **{"train.on_nonfinite_loss": "skip"})
    with pytest.raises(train.TrainingError, match="8 batches in a row .* had a non-finite loss"):
        train.do_train(cfg)
    assert len(calls) == 8  # 34 training scenes in batches of 4
    assert not list_snapshots(cfg)


def test_a_gpu_that_torch_cannot_use_says_why_and_offers_the_cpu(tiny_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU torch can use")
    cfg_file = write_cfg(fast_cfg(tiny_data, tmp_path, "gpu"), tmp_path)
    proc = run_cli("train.py", "--cfg", cfg_file, "train.max_iter", "2", "--gpu", "0")
    reason = "CPU-only build" if torch.version.cuda is None else "finds no usable NVIDIA GPU"
    assert_cli_error(proc, "GPU 0 was asked for", reason, f"python train.py --cfg {cfg_file} train.max_iter 2 --gpu -1")
    assert not os.path.exists(tmp_path / "gpu")


def test_flags_after_the_overrides_work(tiny_data, tmp_path):
    cfg_file = write_cfg(fast_cfg(tiny_data, tmp_path, "flags"), tmp_path)
    proc = run_cli("train.py", "--cfg", cfg_file, "train.max_iter", "1", "train.snapshot_interval", "1", "--gpu", "-1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train.py", "--cfg", cfg_file, "train.max_iter", "1", "--gpus", "1")
    assert proc.returncode == 2 and "unknown option --gpus" in proc.stderr


def test_bad_input_fails_before_training(tiny_data, tmp_path):
    cases = [({"data.vocab_json": str(tmp_path / "none" / "vocab.json")}, DataError,
              f"data.vocab_json = {tmp_path}/none/vocab.json does not exist; make it with: python "
              "scripts/preprocess_captions_transformer.py"),
             ({"data.val.max_samples": 0}, DataError, "split 'val' is empty (data.val.max_samples = 0"),
             ({"model.change_detector.feat_dim": 100}, DataError,
              "has features of 256 channels, so model.change_detector.feat_dim must be 258"),
             ({"data.anno_json": str(tmp_path / "none" / "anno.json")}, EvalError, f"{tmp_path}/none/anno.json does not exist")]
    for overrides, error, message in cases:
        cfg = fast_cfg(tiny_data, tmp_path, "bad", **overrides)
        with pytest.raises(error) as caught:
            train.do_train(cfg)
        assert message in str(caught.value)
        assert not list_snapshots(cfg)


def test_no_java_fails_before_training(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")  # validation scores captions with Java's PTB tokenizer
    cfg = fast_cfg(tiny_data, tmp_path, "nojava")
    with pytest.raises(EvalError, match="Java is not installed.*apt-get install default-jre-headless"):
        train.do_train(cfg)
    assert not list_snapshots(cfg)


def test_output_folder_under_a_file_or_read_only(tiny_data, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    cfg = tiny_cfg(tiny_data, exp_dir=str(tmp_path / "afile" / "x"), exp_name="out")
    proc = train_cli(cfg, tmp_path)
    assert_cli_error(proc, f"cannot write to the experiment folder {tmp_path}/afile/x/out (Not a directory)",
                     "set exp_dir to a writable folder")
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        with pytest.raises(ExperimentError, match="cannot write to the experiment folder .*Permission denied"):
            train.do_train(tiny_cfg(tiny_data, exp_dir=str(tmp_path / "ro"), exp_name="out"))


def test_test_cli_names_the_snapshots_and_the_command_that_works(trained_experiment, tmp_path):
    cfg_file = write_cfg(trained_experiment, tmp_path)
    proc = run_cli("test.py", "--cfg", cfg_file, "--snapshot", "7")
    assert_cli_error(proc, "has no snapshot of iteration 7", "its snapshots: 2; best on validation: 2",
                     f"python test.py --cfg {cfg_file} --snapshot best")
    proc = run_cli("test.py", "--cfg", cfg_file, "--snapshot", "best")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "captions of snapshot 2" in proc.stdout


def test_vocab_size_from_the_vocab_is_announced_once(tiny_data, tmp_path, capsys):
    cfg = fast_cfg(tiny_data, tmp_path, "vocab", **{"model.speaker.vocab_size": 50, "train.max_iter": 1,
                                                    "train.snapshot_interval": 1})
    train.do_train(cfg)
    out = capsys.readouterr().out
    line = f"model.speaker.vocab_size is 50 in the config but {tiny_data['vocab']} has 76 entries: using 76"
    assert out.count(line) == 1, out
    assert load_snapshot(snapshot_path(cfg, 1))["config"]["model"]["speaker"]["vocab_size"] == 76


def test_unreadable_feature_in_a_loader_worker_keeps_the_plain_message(tiny_data, tmp_path):
    paths = copy_data(tiny_data, tmp_path, "features")
    dataset = RCCDataset(tiny_cfg(paths, **{"data.swap_prob": 0.0}), "val")
    with open(dataset.features.files[0][0], "wb") as handle:
        handle.write(b"\x93NUMPY broken")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    text = str(caught.value)
    assert text.startswith(f"feature file {dataset.features.files[0][0]} cannot be read")
    assert "Traceback" not in text and "re-run scripts/extract_features.py" in text


def test_snippet_not_written_is_named_by_train_py(monkeypatch, tiny_data, tmp_path, capsys):
    from utils.utils import CrossEn

    def unwritten(self, sim_matrix):
        raise NotImplementedError("utils.CrossEn")

    monkeypatch.setattr(CrossEn, "forward", unwritten)
    cfg_file = write_cfg(fast_cfg(tiny_data, tmp_path, "todo"), tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--cfg", cfg_file])
    assert exit_info.value.code == 2
    assert "error: the snippet utils.CrossEn is not implemented yet" in capsys.readouterr().err


def test_the_assignment_test_command_after_the_quick_run_names_the_command_that_works(trained_experiment, tmp_path):
    # The quick config's experiment, as a quick run would leave it; the paper config's has nothing.
    quick = tmp_path / "experiments" / "SCORER+CBR_quick" / "snapshots"
    quick.mkdir(parents=True)
    os.link(snapshot_path(trained_experiment, 2), quick / "SCORER+CBR_quick_checkpoint_2.pt")
    proc = run_cli("test.py", "--cfg", "configs/dynamic/transformer.yaml", "--snapshot", "10000", "--gpu", "-1",
                   "exp_dir", tmp_path / "experiments")
    assert_cli_error(proc, f"no snapshots in {tmp_path}/experiments/SCORER+CBR (configs/dynamic/transformer.yaml "
                           f"trains there; train first)",
                     f"configs/dynamic/transformer_quick.yaml has snapshots in {tmp_path}/experiments/SCORER+CBR_quick "
                     f"(2): python test.py --cfg configs/dynamic/transformer_quick.yaml --snapshot last --gpu -1 exp_dir "
                     f"{tmp_path}/experiments")
