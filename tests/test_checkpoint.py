"""utils/checkpoint.py: atomic snapshots, loading that never runs pickled code, clear errors for broken,
foreign or mismatching snapshots, and a full disk."""
import errno
import json
import os
import re
import shutil

import pytest
import torch

import test as test_script
import train
from utils import checkpoint
from utils.checkpoint import SnapshotError, config_differences, load_snapshot, save_snapshot, snapshot_path


@pytest.fixture
def own_copy(trained_experiment, tmp_path):
    """A writable copy of the trained_experiment fixture's folder, and its config."""
    shutil.copytree(os.path.join(trained_experiment.exp_dir, trained_experiment.exp_name),
                    tmp_path / trained_experiment.exp_name)
    cfg = trained_experiment.clone()
    cfg.defrost()
    cfg.exp_dir = str(tmp_path)
    cfg.freeze()
    return cfg


def test_failed_write_keeps_the_previous_snapshot_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "snapshots" / "x_checkpoint_2.pt")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_snapshot(path, {"change_detector_state": {"w": torch.ones(3)}, "speaker_state": {}, "config": {},
                         "vocab": {}})
    assert events == ["fsync", "replace", "fsync"]  # data synced before the rename, then the folder

    def crash_mid_write(obj, handle):
        handle.write(b"PK\x03\x04 half a snapshot")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="Input/output error"):
        save_snapshot(path, {"change_detector_state": {"w": torch.zeros(3)}, "speaker_state": {}})
    assert os.listdir(tmp_path / "snapshots") == ["x_checkpoint_2.pt"]
    assert torch.equal(load_snapshot(path)["change_detector_state"]["w"], torch.ones(3))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
                                                  "failed writing file data/3: file write failed")])
def test_full_disk_is_one_line_naming_the_folder_and_the_space(tmp_path, monkeypatch, failure):
    path = str(tmp_path / "snapshots" / "x_checkpoint_4.pt")
    save_snapshot(str(tmp_path / "snapshots" / "x_checkpoint_2.pt"), {"w": torch.ones(3)})

    def full(obj, handle):
        handle.write(b"PK")
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(SnapshotError) as caught:
        save_snapshot(path, {"w": torch.zeros(1000)})
    text = str(caught.value)
    assert text.startswith(f"no space left in {tmp_path / 'snapshots'} while writing x_checkpoint_4.pt")
    assert "MiB" in text and "continue with --resume" in text and "\n" not in text
    assert sorted(os.listdir(tmp_path / "snapshots")) == ["x_checkpoint_2.pt"]


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_runs_pickled_code(tmp_path):
    path, marker = str(tmp_path / "evil.pt"), str(tmp_path / "code_ran")
    torch.save({"change_detector_state": _RunsCodeWhenUnpickled(marker), "speaker_state": {}}, path)
    with pytest.raises(SnapshotError, match="not a readable snapshot .*Unsupported global") as caught:
        load_snapshot(path)
    assert not os.path.exists(marker)
    assert "weights_only" not in str(caught.value)  # torch's advice to load it unsafely is dropped
    torch.load(path, weights_only=False)  # what an unsafe load would have done
    assert os.path.exists(marker)


def _break(path, kind):
    if kind == "text file":
        with open(path, "w") as handle:
            handle.write("these are not weights\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "foreign dict":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    elif kind == "truncated":
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)


BROKEN = [("text file", "is not a readable snapshot"),
          ("tensor", "is not a snapshot: it holds a Tensor"),
          ("foreign dict", "is not a snapshot of this project: it lacks change_detector_state, speaker_state, "),
          ("truncated", "it may be truncated")]


@pytest.mark.snippets
@pytest.mark.parametrize("kind, message", BROKEN, ids=[kind for kind, _ in BROKEN])
def test_broken_snapshot_is_a_clear_error_in_test_and_resume(own_copy, kind, message):
    path = snapshot_path(own_copy, 2)
    _break(path, kind)
    with pytest.raises(SnapshotError) as caught:
        test_script.run_test(own_copy, 2)
    assert path in str(caught.value) and message in str(caught.value)
    with pytest.raises(SnapshotError, match=re.escape(message) + ".*no earlier snapshot loads either"):
        train.do_train(own_copy, resume=True)


@pytest.mark.snippets
def test_weights_only_snapshot_serves_test_py_but_not_resume(own_copy):
    path = snapshot_path(own_copy, 2)
    snapshot = load_snapshot(path)
    for key in ("optimizer_state", "scheduler_state", "rng_state"):  # stripped to save space, say
        del snapshot[key]
    torch.save(snapshot, path)
    out_dir = test_script.run_test(own_copy, 2)
    assert json.load(open(os.path.join(out_dir, "sc_results.json")))
    with pytest.raises(SnapshotError, match=re.escape(f"{path} is not a snapshot of this project: it lacks "
                                                      f"optimizer_state, scheduler_state, rng_state")):
        train.do_train(own_copy, resume=True)


@pytest.mark.snippets
def test_other_architecture_names_the_mismatching_keys(own_copy):
    path = snapshot_path(own_copy, 2)
    snapshot = load_snapshot(path)
    # A decoder whose layer was saved under another name (say, by another code base).
    state = snapshot["speaker_state"]
    state["core.layer.0.attn.query.weight"] = state.pop("core.layer.0.self_attention.query.weight")
    torch.save(snapshot, path)
    with pytest.raises(SnapshotError, match=re.escape(
            "speaker_state does not fit the model built from the config (missing keys "
            "['core.layer.0.self_attention.query.weight']; unexpected keys ['core.layer.0.attn.query.weight'])")):
        test_script.run_test(own_copy, 2)


def test_config_differences_skip_what_does_not_change_training(trained_experiment):
    stored = checkpoint.config_to_dict(trained_experiment)
    changed = trained_experiment.clone()
    changed.defrost()
    changed.train.max_iter = 9
    changed.data.train.batch_size = 2
    changed.gpu_id = 3
    changed.logger.port = 1234
    changed.train.optim.betas = (0.5, 0.9)
    assert config_differences(stored, changed) == ["data.train.batch_size: 4 -> 2", "train.max_iter: 2 -> 9",
                                                   "train.optim.betas: [0.9, 0.999] -> (0.5, 0.9)"]
    assert config_differences(stored, trained_experiment) == []
