"""Reliability: interrupted training, safe snapshot loading, non-finite losses, fail-fast checks.

Checked elsewhere and not repeated here:
- exact resume: test_pipeline.py::test_resume_gives_identical_weights_and_losses
- a snapshot that does not exist lists the ones that do:
  test_pipeline.py::test_missing_snapshot_lists_the_ones_that_exist (its CLI side is below)
- config file missing, unknown key, wrong type: test_models.py::test_config_rejects_unknown_keys_and_wrong_types
- data errors: test_dataset.py (test_missing_feature_folder, test_feature_folders_with_different_ids,
  test_split_id_without_features, test_wrong_shape_checked_up_front_and_on_load,
  test_missing_label_file_names_the_command, test_h5_lacking_a_dataset, test_empty_split_after_max_samples)
- evaluate on an empty or malformed results folder: test_evaluate.py::test_evaluate_cli_rejects_bad_results;
  no Java for the tokenizer: test_evaluate.py::test_missing_java_is_a_clear_error
- no visdom server on the port: test_logger.py::test_dashboard_without_server_warns_once_and_is_fast
"""
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import test as test_script
import train
from tests.helpers import tiny_cfg
from tests.helpers import SMALL_MODEL
from utils import checkpoint
from utils.checkpoint import SnapshotError, list_snapshots, load_snapshot, save_snapshot, snapshot_path
from utils.dataset import DataError, RCCDataset
from models.captioner import CaptionModel
from utils.eval_utils import EvalError

pytestmark = pytest.mark.snippets  # most tests build or train the model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest model the tiny data allows, one validation scene: seconds per run on 2 busy cores.
FAST = {**SMALL_MODEL, "model.change_detector.att_layer": 1, "model.speaker.layer": 1,
        "data.val.max_samples": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On 2 busy cores two torch threads spin against each other: a tiny step takes seconds, not 40 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_thread_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def fast_cfg(tiny_data, tmp_path, name, **overrides):
    return tiny_cfg(tiny_data, exp_dir=str(tmp_path), exp_name=name, **{**FAST, **overrides})


def run_cli(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env or one_thread_env(), timeout=timeout)


def assert_cli_error(proc, *fragments):
    """Exit 2, an `error: ...` line on stderr naming every fragment, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr
    for fragment in fragments:
        assert fragment in errors[-1], (fragment, errors[-1])


def nothing_trained(cfg):
    exp_root = os.path.join(cfg.exp_dir, cfg.exp_name)
    return (not os.path.exists(checkpoint.snapshot_dir(cfg))
            and not os.path.exists(os.path.join(exp_root, "train_log.txt")))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A finished 2-iteration experiment (snapshot 2); copy it before breaking anything."""
    cfg = fast_cfg(tiny_data, tmp_path_factory.mktemp("trained"), "base",
                   **{"train.max_iter": 2, "train.snapshot_interval": 2})
    train.do_train(cfg)
    return cfg


@pytest.fixture
def own_copy(trained, tmp_path):
    """A writable copy of the ``trained`` experiment and its config."""
    shutil.copytree(os.path.join(trained.exp_dir, trained.exp_name), tmp_path / trained.exp_name)
    cfg = trained.clone()
    cfg.defrost()
    cfg.exp_dir = str(tmp_path)
    cfg.freeze()
    return cfg


# ------------------------------------------------------------------ 1. interrupted training
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
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        save_snapshot(path, {"change_detector_state": {"w": torch.zeros(3)}, "speaker_state": {}})
    assert os.listdir(tmp_path / "snapshots") == ["x_checkpoint_2.pt"]
    assert torch.equal(load_snapshot(path)["change_detector_state"]["w"], torch.ones(3))


def start_training(cfg, tmp_path, *overrides):
    """train.py in a subprocess on cfg (dumped to YAML); returns (Popen, stdout path, stderr path)."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.dump())
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "train.py", "--cfg", str(cfg_file), *overrides],
                                cwd=ROOT, stdout=stdout, stderr=stderr, env=one_thread_env())
    return proc, out, err


def wait_for_first_snapshot(proc, cfg, err, timeout=150):
    deadline = time.monotonic() + timeout
    while not list_snapshots(cfg):
        if proc.poll() is not None:
            pytest.fail(f"train.py exited with {proc.returncode} before its first snapshot:\n"
                        f"{err.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no snapshot after {timeout} s:\n{err.read_text()[-3000:]}")
        time.sleep(0.05)


def test_sigterm_saves_the_current_iteration_and_says_how_to_resume(tiny_data, tmp_path):
    cfg = fast_cfg(tiny_data, tmp_path, "term")
    proc, out, err = start_training(cfg, tmp_path, "train.max_iter", "100000", "train.snapshot_interval", "2")
    try:
        wait_for_first_snapshot(proc, cfg, err)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, err.read_text()[-3000:]
    finally:
        proc.kill()
    stdout = out.read_text()
    stopped = re.search(r"SIGTERM: stopped at iteration (\d+); continue with `python train\.py "
                        r"--cfg <same config> --resume`", stdout)
    assert stopped, stdout
    iteration = int(stopped.group(1))
    assert f"SIGTERM: saved {snapshot_path(cfg, iteration)}" in stdout
    assert list_snapshots(cfg)[-1] == iteration
    assert load_snapshot(snapshot_path(cfg, iteration))["iteration"] == iteration
    assert "Traceback" not in err.read_text()


def test_ctrl_c_saves_the_current_iteration(tiny_data, tmp_path, monkeypatch, capsys):
    calls = []
    forward = CaptionModel.forward

    def interrupted_at_fourth_batch(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward(self, *args)

    monkeypatch.setattr(CaptionModel, "forward", interrupted_at_fourth_batch)
    cfg = fast_cfg(tiny_data, tmp_path, "ctrlc", **{"train.max_iter": 10, "train.snapshot_interval": 100})
    with pytest.raises(SystemExit) as stop:
        train.do_train(cfg)
    assert stop.value.code == 130
    out = capsys.readouterr().out
    assert f"Ctrl-C: saved {snapshot_path(cfg, 3)}" in out
    assert "Ctrl-C: stopped at iteration 3; continue with `python train.py --cfg <same config> --resume`" in out
    assert list_snapshots(cfg) == [3] and load_snapshot(snapshot_path(cfg, 3))["iteration"] == 3


def test_sigkill_at_a_random_moment_leaves_every_snapshot_loadable(tiny_data, tmp_path):
    cfg = fast_cfg(tiny_data, tmp_path, "kill")
    # A snapshot every iteration: the kill often lands in or near a write.
    proc, _, err = start_training(cfg, tmp_path, "train.max_iter", "100000", "train.snapshot_interval", "1")
    delay = random.uniform(0.0, 2.0)
    try:
        wait_for_first_snapshot(proc, cfg, err)
        time.sleep(delay)
    finally:
        proc.kill()
        proc.wait()
    folder = checkpoint.snapshot_dir(cfg)
    names = sorted(os.listdir(folder))
    snapshots = [name for name in names if name.endswith(".pt")]
    assert snapshots, (delay, names)
    for name in snapshots:
        iteration = int(re.search(r"_checkpoint_(\d+)\.pt$", name).group(1))
        assert load_snapshot(os.path.join(folder, name))["iteration"] == iteration, (delay, name)
    # A temp file cut short by the kill may remain; its name keeps it out of the snapshot list.
    assert all(".pt.tmp." in name for name in set(names) - set(snapshots)), (delay, names)
    assert len(list_snapshots(cfg)) == len(snapshots)


# ------------------------------------------------------------------ 3. safe snapshot loading
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


@pytest.mark.parametrize("kind, message", BROKEN, ids=[kind for kind, _ in BROKEN])
def test_broken_snapshot_is_a_clear_error_in_test_and_resume(own_copy, kind, message):
    path = snapshot_path(own_copy, 2)
    _break(path, kind)
    with pytest.raises(SnapshotError) as caught:
        test_script.run_test(own_copy, 2)
    assert path in str(caught.value) and message in str(caught.value)
    resume = own_copy.clone()
    resume.defrost()
    resume.train.max_iter = 4
    with pytest.raises(SnapshotError, match=re.escape(message)):
        train.do_train(resume, resume=True)


def test_weights_only_snapshot_serves_test_py_but_not_resume(own_copy):
    path = snapshot_path(own_copy, 2)
    snapshot = load_snapshot(path)
    for key in ("optimizer_state", "scheduler_state", "rng_state"):  # stripped to save space, say
        del snapshot[key]
    torch.save(snapshot, path)
    out_dir = test_script.run_test(own_copy, 2)
    assert json.load(open(os.path.join(out_dir, "sc_results.json")))
    resume = own_copy.clone()
    resume.defrost()
    resume.train.max_iter = 4
    with pytest.raises(SnapshotError, match=re.escape(f"{path} is not a snapshot of this project: it lacks "
                                                      f"optimizer_state, scheduler_state, rng_state")):
        train.do_train(resume, resume=True)


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


@pytest.mark.parametrize("key, value, message", [
    ("model.change_detector.att_layer", 2, "change_detector_state does not fit the model built from the config "
                                           "(missing keys ['scorer.1.attention.key.bias'"),
    ("model.speaker.word_dim", 24, "speaker_state does not fit the model built from the config (shape "
                                   "mismatch core.embed.weight: snapshot (76, 16) vs model (76, 24)"),
])
def test_resume_with_another_architecture_names_the_keys(own_copy, key, value, message):
    cfg = own_copy.clone()
    cfg.defrost()
    cfg.merge_from_list([key, value, "train.max_iter", 4])
    with pytest.raises(SnapshotError, match=re.escape(message)):
        train.do_train(cfg, resume=True)
    assert list_snapshots(cfg) == [2]


def test_resume_without_snapshots(tiny_data, tmp_path):
    cfg = fast_cfg(tiny_data, tmp_path, "fresh")
    with pytest.raises(train.TrainingError, match="--resume: no snapshot in .*; start without --resume"):
        train.do_train(cfg, resume=True)


def test_test_cli_lists_the_snapshots_that_exist(trained, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(trained.dump())
    assert_cli_error(run_cli("test.py", "--cfg", str(cfg_file), "--snapshot", "7"),
                     "no snapshot for iteration 7", "available: 2")


# ------------------------------------------------------------------ 4. non-finite loss
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
                                                  r"snapshot is kept.*train.on_nonfinite_loss skip"):
        train.do_train(cfg)
    assert list_snapshots(cfg) == [2]
    assert load_snapshot(snapshot_path(cfg, 2))["iteration"] == 2


def test_nonfinite_loss_skip_drops_the_batch(tiny_data, tmp_path, monkeypatch, capsys):
    calls = nan_loss_at({3}, monkeypatch)
    cfg = fast_cfg(tiny_data, tmp_path, "skip", **{"train.max_iter": 4, "train.snapshot_interval": 4,
                                                   "train.on_nonfinite_loss": "skip"})
    assert train.do_train(cfg) == snapshot_path(cfg, 4)
    assert len(calls) == 5
    out = capsys.readouterr().out
    assert re.search(r"non-finite loss at iteration 3 \(total nan, caption nan, .*\); batch skipped", out)
    snapshot = load_snapshot(snapshot_path(cfg, 4))
    assert all(torch.isfinite(v).all() for v in snapshot["speaker_state"].values())


def test_skip_gives_up_after_an_epoch_of_nonfinite_losses(tiny_data, tmp_path, monkeypatch):
    calls = nan_loss_at(set(), monkeypatch, compute=False)
    cfg = fast_cfg(tiny_data, tmp_path, "allnan", **{"train.on_nonfinite_loss": "skip"})
    with pytest.raises(train.TrainingError, match="8 batches in a row .* had a non-finite loss"):
        train.do_train(cfg)
    assert len(calls) == 8  # 34 training scenes in batches of 4
    assert not list_snapshots(cfg)


# ------------------------------------------------------------------ 5. fail fast on bad input
def _missing(tmp_path, name):
    return str(tmp_path / "no_such_folder" / name)


FAIL_FAST = [
    ("data folder missing", lambda t: {"data.splits_json": _missing(t, "splits.json")}, DataError,
     "data.splits_json = {t}/no_such_folder/splits.json does not exist; unpack the data"),
    ("vocab missing", lambda t: {"data.vocab_json": _missing(t, "vocab.json")}, DataError,
     "data.vocab_json = {t}/no_such_folder/vocab.json does not exist; make it with: python "
     "scripts/preprocess_captions_transformer.py"),
    ("empty validation split", lambda t: {"data.val.max_samples": 0}, DataError,
     "split 'val' is empty (data.val.max_samples = 0"),
    ("feat_dim", lambda t: {"model.change_detector.feat_dim": 100}, train.TrainingError,
     "have 256 channels, so model.change_detector.feat_dim must be 258"),
    ("annotations missing", lambda t: {"data.anno_json": _missing(t, "anno.json")}, EvalError,
     "{t}/no_such_folder/anno.json does not exist"),
]


@pytest.mark.parametrize("case, overrides, error, message", FAIL_FAST, ids=[c[0] for c in FAIL_FAST])
def test_bad_input_fails_before_training(tiny_data, tmp_path, case, overrides, error, message):
    cfg = fast_cfg(tiny_data, tmp_path, "bad", **overrides(tmp_path))
    with pytest.raises(error) as caught:
        train.do_train(cfg)
    assert message.format(t=tmp_path) in str(caught.value)
    assert nothing_trained(cfg)


def test_no_java_fails_before_training(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")  # validation scores captions with Java's PTB tokenizer
    cfg = fast_cfg(tiny_data, tmp_path, "nojava")
    with pytest.raises(EvalError, match="Java is not installed.*apt-get install default-jre-headless"):
        train.do_train(cfg)
    assert nothing_trained(cfg)


def test_evaluate_cli_without_java(tiny_data, tmp_path):
    scene = "%06d.png" % json.load(open(tiny_data["splits"]))["test"][0]
    folder = tmp_path / "results" / "run"
    folder.mkdir(parents=True)
    (folder / "sc_results.json").write_text(json.dumps([{"image_id": scene, "caption": "a thing moved"}]))
    (folder / "nsc_results.json").write_text(json.dumps([{"image_id": scene + "_n", "caption": "no change"}]))
    proc = run_cli("evaluate.py", "--results_dir", str(tmp_path / "results"), "--anno", tiny_data["anno"],
                   "--type_file", tiny_data["type_mapping"], env={**one_thread_env(), "PATH": ""})
    assert_cli_error(proc, "Java is not installed", "make sure `java` is on PATH")


def test_vocab_size_from_the_vocab_is_announced_once(tiny_data, tmp_path, capsys):
    cfg = fast_cfg(tiny_data, tmp_path, "vocab", **{"model.speaker.vocab_size": 50, "train.max_iter": 1,
                                                    "train.snapshot_interval": 1})
    train.do_train(cfg)
    out = capsys.readouterr().out
    line = (f"model.speaker.vocab_size is 50 in the config but {tiny_data['vocab']} has 76 entries: "
            f"using 76")
    assert out.count(line) == 1, out
    assert load_snapshot(snapshot_path(cfg, 1))["config"]["model"]["speaker"]["vocab_size"] == 76


def test_unreadable_feature_in_a_loader_worker_keeps_the_plain_message(tiny_data, tmp_path):
    features = tmp_path / "features"
    shutil.copytree(tiny_data["features"], features)
    cfg = tiny_cfg({**tiny_data, "features": str(features)}, **{"data.swap_prob": 0.0})
    dataset = RCCDataset(cfg, "val")
    with open(dataset.feature_files[0][0], "wb") as handle:
        handle.write(b"\x93NUMPY broken")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    text = str(caught.value)
    assert text.startswith(f"feature file {dataset.feature_files[0][0]} cannot be read")
    assert "Traceback" not in text and "re-run scripts/extract_features.py" in text


def test_output_folder_under_a_file(tiny_data, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    cfg = tiny_cfg(tiny_data, exp_dir=str(tmp_path / "afile" / "x"), exp_name="out")
    with pytest.raises(train.TrainingError, match=re.escape(
            f"cannot write to the experiment folder {tmp_path}/afile/x/out (Not a directory); "
            f"set exp_dir to a writable folder")):
        train.do_train(cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tiny_data, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    cfg = tiny_cfg(tiny_data, exp_dir=str(tmp_path / "ro"), exp_name="out")
    with pytest.raises(train.TrainingError, match="cannot write to the experiment folder .*Permission denied"):
        train.do_train(cfg)


@pytest.mark.parametrize("case", ["config file missing", "output folder under a file"])
def test_train_cli_errors(tiny_data, tmp_path, case):
    cfg_file = tmp_path / "cfg.yaml"
    if case == "config file missing":
        proc = run_cli("train.py", "--cfg", str(cfg_file))
        assert_cli_error(proc, f"config file {cfg_file} does not exist")
    else:
        cfg_file.write_text(tiny_cfg(tiny_data).dump())
        (tmp_path / "afile").write_text("")
        proc = run_cli("train.py", "--cfg", str(cfg_file), "exp_dir", str(tmp_path / "afile" / "x"))
        assert_cli_error(proc, "cannot write to the experiment folder", "set exp_dir to a writable folder")


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


def test_busy_visdom_port_warns_and_training_goes_on(tiny_data, tmp_path):
    with _BusyPort() as busy:
        cfg = fast_cfg(tiny_data, tmp_path, "busy", **{"logger.visdom": True, "logger.port": busy.port,
                                                       "train.max_iter": 1, "train.snapshot_interval": 1})
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
        demo.start_visdom(8097)
    else:
        visdom_server.start_server(8097, str(tmp_path), None)
    [cmd] = commands
    # --hostname only changes the address visdom prints; -bind_local makes it listen on 127.0.0.1
    # (without it tornado listens on every interface).
    assert visdom_server_options(cmd, monkeypatch)["bind_local"] is True, f"{starter}: {cmd}"
