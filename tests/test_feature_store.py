"""The feature store: packing from folders, a streamed archive or images; reading it as the loose files are read;
resuming, adding ids, and every bad input the packer and the loader stop at."""
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile

import h5py
import numpy as np
import pytest
import torch

import train
from configs.defaults import load_config
from scripts.pack_features import main as pack_main
from tests.helpers import ROOT, SMALL_MODEL, assert_cli_error, run_cli, tiny_cfg, write_cfg
from utils.dataset import DataError, RCCDataset, eval_loader, train_batches
from utils.feature_store import SET_NAMES, FeatureStore, StoreError
from utils.fileio import FileLock
from utils.packing import wanted_ids


@pytest.fixture
def cfg_file(tiny_data, tmp_path):
    return write_cfg(tiny_cfg(tiny_data), tmp_path)


def with_data_dir(cfg_file, args):
    """args with the data folder of cfg_file after a bare --from_folders or --from_images."""
    folder = os.path.dirname(load_config(cfg_file).data.default_feature_dir)
    expanded = []
    for k, arg in enumerate(args):
        expanded.append(arg)
        if arg in ("--from_folders", "--from_images") and (k + 1 == len(args) or args[k + 1].startswith("--")):
            expanded.append(folder)
    return expanded


def pack(cfg_file, store, *source, dtype="float16", expect=0, capsys=None):
    """pack_features.py in this process; returns its exit status (0 when it returned)."""
    try:
        pack_main(["--cfg", cfg_file, *with_data_dir(cfg_file, source), "--output", str(store), "--dtype", dtype])
    except SystemExit as stop:
        assert stop.code == expect, capsys.readouterr().err if capsys else stop.code
        return stop.code
    assert expect == 0
    return 0


def contents(path):
    """{dataset: array} of a store, rows ordered by scene id (the packers may append rows in any order)."""
    with h5py.File(path, "r") as f:
        order = np.argsort(f["ids"][()])
        found = {"ids": f["ids"][()][order], "written": f["written"][()][:, order]}
        for name in SET_NAMES:
            found[name] = f[name][()][order]
            found[f"names/{name}"] = f["names"][name][()][order]
    return found


def assert_same_store(a, b):
    a, b = contents(a), contents(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def make_archive(data_root, path, prefix="", extra=(), skip=0, only=None):
    """A .tar.gz of the three feature folders (members under ``prefix``), plus ``extra`` (name, bytes) members."""
    with tarfile.open(path, "w:gz") as tar:
        for folder in SET_NAMES:
            for name in sorted(os.listdir(os.path.join(data_root, folder)))[skip:only]:
                tar.add(os.path.join(data_root, folder, name), arcname=f"{prefix}{folder}/{name}")
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ------------------------------------------------------------------ the loader reads a store as the files
def test_float32_store_gives_the_same_batches_and_exactly_the_same_losses(tiny_data, cfg_file, tmp_path):
    store = tmp_path / "f32.h5"
    pack(cfg_file, store, "--from_folders", dtype="float32")
    loose_cfg = tiny_cfg(tiny_data, **{"data.swap_prob": 0.5})
    store_cfg = tiny_cfg(tiny_data, **{"data.swap_prob": 0.5, "data.feature_store": str(store)})
    for split in ("train", "val", "test"):
        a, b = RCCDataset(loose_cfg, split, verbose=False), RCCDataset(store_cfg, split, verbose=False)
        assert a.ids == b.ids and a.image_files == b.image_files and a.feature_shape == b.feature_shape
    device = torch.device("cpu")
    loose = train_batches(RCCDataset(loose_cfg, "train"), loose_cfg, device)
    packed = train_batches(RCCDataset(store_cfg, "train"), store_cfg, device)
    for _ in range(5):  # more than an epoch (3 batches)
        x, y = next(loose), next(packed)
        assert x["image_id"].tolist() == y["image_id"].tolist()
        for key in ("d_feat", "n_feat", "q_feat", "pos_labels", "neg_labels"):
            assert torch.equal(x[key], y[key]), key

    common = dict(exp_dir=str(tmp_path), **SMALL_MODEL, **{"train.max_iter": 3, "train.snapshot_interval": 3,
                                                         "train.log_interval": 1})
    runs = [tiny_cfg(tiny_data, exp_name="loose", **common),
            tiny_cfg(tiny_data, exp_name="store", **common, **{"data.feature_store": str(store)})]
    losses = []
    for cfg in runs:
        train.do_train(cfg)
        records = [json.loads(line) for line in open(os.path.join(cfg.exp_dir, cfg.exp_name, "metrics.jsonl"))]
        losses.append([{k: v for k, v in r.items() if k != "it_per_s"} for r in records])
    assert losses[0] == losses[1] and len(losses[0]) == 4  # three training records and a validation


def test_float16_store_holds_the_rounded_features_and_losses_agree_within_rounding(tiny_data, cfg_file, tmp_path):
    from models.captioner import CaptionModel

    store = tmp_path / "f16.h5"
    pack(cfg_file, store, "--from_folders")
    cfg = tiny_cfg(tiny_data, **{"data.swap_prob": 0.0}, **SMALL_MODEL)
    store_cfg = tiny_cfg(tiny_data, **{"data.swap_prob": 0.0, "data.feature_store": str(store)}, **SMALL_MODEL)
    loose, packed = (next(iter(eval_loader(RCCDataset(c, "val"), c, torch.device("cpu")))) for c in (cfg, store_cfg))
    for key in ("d_feat", "n_feat", "q_feat"):
        assert packed[key].dtype == torch.float32
        assert torch.equal(packed[key], loose[key].half().float()), key  # float16 rounding, nothing else
        assert not torch.equal(packed[key], loose[key])
    torch.manual_seed(0)
    model = CaptionModel(cfg).eval()
    with torch.no_grad():
        exact = model(loose, 0.1, 0.001)
        rounded = model({**loose, **{k: loose[k].half().float() for k in ("d_feat", "n_feat", "q_feat")}}, 0.1, 0.001)
        from_store = model(packed, 0.1, 0.001)
    for key in exact:
        assert torch.equal(from_store[key], rounded[key]), key
        torch.testing.assert_close(from_store[key], exact[key], rtol=2e-3, atol=2e-4)


def _read_in_child(store, scene_id, queue):
    array = store.read("features", scene_id)
    queue.put((store._pid == os.getpid(), float(array.sum())))


def test_each_process_opens_its_own_handle(tiny_data, cfg_file, tmp_path):
    store_path = tmp_path / "s.h5"
    pack(cfg_file, store_path, "--from_folders")
    store = FeatureStore(str(store_path))
    scene_id = store.ids[0]
    expected = float(store.read("features", scene_id).sum())  # the parent holds a handle now
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_read_in_child, args=(store, scene_id, queue))
    child.start()
    child.join(30)
    assert queue.get(timeout=5) == (True, expected)
    assert store._pid == os.getpid()
    # A loader with two worker processes yields what one process does.
    batches = {}
    for workers in (0, 2):
        cfg = tiny_cfg(tiny_data, **{"data.feature_store": str(store_path), "data.num_workers": workers,
                                     "data.test.batch_size": 1})
        batches[workers] = [b["d_feat"] for b in eval_loader(RCCDataset(cfg, "test", verbose=False), cfg,
                                                             torch.device("cpu"))]
    assert len(batches[0]) == len(batches[2]) == 4
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))


# ------------------------------------------------------------------ sources: archive, folders, images
def test_archive_streamed_equals_folders_with_or_without_a_leading_folder(tiny_data, cfg_file, tmp_path):
    pack(cfg_file, tmp_path / "folders.h5", "--from_folders")
    for prefix in ("", "clevr_change/"):
        archive = tmp_path / f"features{len(prefix)}.tar.gz"
        # Extra members the packer must pass over: another folder, a README, a directory entry.
        make_archive(tiny_data["root"], archive, prefix, extra=[(f"{prefix}README.txt", b"hello"),
                                                               (f"{prefix}images/CLEVR_default_000000.png", b"x")])
        pack(cfg_file, tmp_path / f"archive{len(prefix)}.h5", "--from_archive", str(archive))
        assert_same_store(tmp_path / "folders.h5", tmp_path / f"archive{len(prefix)}.h5")


def test_images_extracted_into_the_store_equal_extracted_files(tiny_data, cfg_file, tmp_path):
    # tiny_data's folders come from scripts/extract_features.py with the settings of tiny_cfg.
    pack(cfg_file, tmp_path / "folders.h5", "--from_folders", dtype="float32")
    pack(cfg_file, tmp_path / "images.h5", "--from_images", dtype="float32")
    a, b = contents(tmp_path / "folders.h5"), contents(tmp_path / "images.h5")
    for key in a:
        if key in SET_NAMES:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)  # batches of other sizes
        else:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_config_subset_packs_only_its_ids_and_a_larger_config_adds_the_rest(tiny_data, tmp_path, capsys):
    small = write_cfg(tiny_cfg(tiny_data, **{"data.train.max_samples": 10, "data.test.max_samples": 2}), tmp_path,
                      "small.yaml")
    full = write_cfg(tiny_cfg(tiny_data), tmp_path, "full.yaml")
    store = tmp_path / "s.h5"
    pack(small, store, "--from_folders")
    packed = FeatureStore(str(store))
    assert sorted(packed.ids) == wanted_ids(tiny_cfg(tiny_data, **{"data.train.max_samples": 10,
                                                                  "data.test.max_samples": 2}))
    assert len(packed.ids) == 10 + 2 + len(RCCDataset(tiny_cfg(tiny_data), "val", verbose=False).ids)
    # The full config needs more: the loader says how many and the command that adds them.
    with pytest.raises(DataError, match=r"of the 34 scene ids of split 'train' that this config uses are not in the "
                                        r"feature store .*python scripts/pack_features.py --cfg .*small.yaml"):
        RCCDataset(tiny_cfg(tiny_data, **{"data.feature_store": str(store)}), "train")
    capsys.readouterr()
    pack(full, store, "--from_folders")
    assert "adding" in capsys.readouterr().out
    pack(full, tmp_path / "direct.h5", "--from_folders")
    assert_same_store(store, tmp_path / "direct.h5")
    pack(full, store, "--from_folders")  # complete: nothing to do
    assert "already holds all 40 scene ids" in capsys.readouterr().out
    # The test split alone, packed when it is needed: a run reads the ids of the splits it uses.
    pack(full, tmp_path / "test.h5", "--from_folders", "--splits", "test")
    test_ids = RCCDataset(tiny_cfg(tiny_data), "test", verbose=False).ids
    assert sorted(FeatureStore(str(tmp_path / "test.h5")).ids) == sorted(test_ids)
    assert RCCDataset(tiny_cfg(tiny_data, **{"data.feature_store": str(tmp_path / "test.h5")}), "test").ids == test_ids


# ------------------------------------------------------------------ interrupted packs resume
def test_ctrl_c_keeps_a_partial_store_that_the_same_command_completes(cfg_file, tmp_path, monkeypatch, capsys):
    from utils import feature_store

    pack(cfg_file, tmp_path / "straight.h5", "--from_folders")
    writes = [0]
    original = feature_store.StoreWriter.write

    def interrupted(self, *args):
        writes[0] += 1
        if writes[0] == 50:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(feature_store.StoreWriter, "write", interrupted)
    pack(cfg_file, tmp_path / "s.h5", "--from_folders", expect=130)
    assert "stopped after 49 images" in capsys.readouterr().out
    assert not (tmp_path / "s.h5").exists() and (tmp_path / "s.h5.partial").exists()
    monkeypatch.undo()
    pack(cfg_file, tmp_path / "s.h5", "--from_folders")
    assert "resuming" in capsys.readouterr().out and not (tmp_path / "s.h5.partial").exists()
    assert_same_store(tmp_path / "straight.h5", tmp_path / "s.h5")


KILLED_PACK = """
import os, signal, sys
from utils import feature_store
from scripts.pack_features import main
feature_store._FLUSH_SECONDS = 0.0  # flush after every image, so a kill lands between and inside writes
original, count = feature_store.StoreWriter.write, [0]
def write(self, *args):
    count[0] += 1
    if count[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args)
feature_store.StoreWriter.write = write
main(sys.argv[2:])
"""


def test_a_killed_pack_resumes_to_the_same_store(cfg_file, tmp_path):
    pack(cfg_file, tmp_path / "straight.h5", "--from_folders")
    for kill_at in (1, 70):
        target = tmp_path / f"killed{kill_at}.h5"
        args = ["--cfg", cfg_file, *with_data_dir(cfg_file, ["--from_folders"]), "--output", str(target)]
        done = subprocess.run([sys.executable, "-c", KILLED_PACK, str(kill_at), *args], cwd=ROOT, capture_output=True)
        assert done.returncode == -signal.SIGKILL
        assert not target.exists()
        pack(cfg_file, target, "--from_folders")
        assert_same_store(tmp_path / "straight.h5", target)


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing lost
def cli_error(capsys, main, argv, *fragments):
    """main(argv) in this process exits with 2 and one `error:` line on stderr naming every fragment."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err[-2000:]
    line = [line for line in err.splitlines() if line.startswith("error: ")][-1]
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def pack_error(capsys, cfg_file, args, *fragments):
    cli_error(capsys, pack_main, ["--cfg", cfg_file, *with_data_dir(cfg_file, args)], *fragments)


def test_a_truncated_or_corrupt_archive_names_it_and_keeps_what_was_packed(tiny_data, cfg_file, tmp_path, capsys):
    archive = tmp_path / "features.tar.gz"
    make_archive(tiny_data["root"], archive)
    data = archive.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[:len(data) // 2])
    store = tmp_path / "s.h5"
    done = run_cli(os.path.join(ROOT, "scripts/pack_features.py"), "--cfg", cfg_file, "--from_archive",
                   str(tmp_path / "cut.tar.gz"), "--output", str(store))  # one real command line
    assert_cli_error(done, f"{tmp_path}/cut.tar.gz ends early", "Download it again", "it keeps the")
    assert not store.exists() and (tmp_path / "s.h5.partial").exists()
    kept = int(h5py.File(tmp_path / "s.h5.partial", "r")["written"][()].sum())
    assert kept > 30
    corrupt = bytearray(data)
    corrupt[len(data) // 3:len(data) // 3 + 64] = b"\x00" * 64
    (tmp_path / "bad.tar.gz").write_bytes(bytes(corrupt))
    pack_error(capsys, cfg_file, ["--from_archive", str(tmp_path / "bad.tar.gz"), "--output", str(store)],
               f"{tmp_path}/bad.tar.gz is damaged", "download it again", "were not kept")
    assert int(h5py.File(tmp_path / "s.h5.partial", "r")["written"][()].sum()) == kept
    (tmp_path / "not.tar.gz").write_bytes(b"this is no archive at all")
    pack_error(capsys, cfg_file, ["--from_archive", str(tmp_path / "not.tar.gz"), "--output", str(tmp_path / "n.h5")],
               f"{tmp_path}/not.tar.gz is damaged", "download it again")
    pack_error(capsys, cfg_file, ["--from_archive", str(tmp_path / "none.tar.gz"), "--output", str(store)],
               "none.tar.gz does not exist")
    pack(cfg_file, store, "--from_archive", str(archive))  # the whole archive: resumes
    assert "resuming" in capsys.readouterr().out
    pack(cfg_file, tmp_path / "straight.h5", "--from_folders")
    assert_same_store(tmp_path / "straight.h5", store)


@pytest.mark.parametrize("array, message", [
    (np.zeros((256, 4, 5), np.float32), "has features of shape (256, 4, 5), and the store holds (256, 4, 4)"),
    (np.zeros((256, 4, 4), np.float64), "is float64 (256, 4, 4), expected float32"),
    (np.full((256, 4, 4), np.nan, np.float32), "holds NaN or Inf values"),
    (np.full((256, 4, 4), 1e6, np.float32), "beyond float16's range (65,504): pack with --dtype float32")])
def test_a_bad_member_is_named(tiny_data, cfg_file, tmp_path, capsys, array, message):
    archive = tmp_path / "features.tar.gz"
    member = "sc_features/CLEVR_semantic_000000.png.npy"
    make_archive(tiny_data["root"], archive, extra=[(member, npy_bytes(array))], skip=1)
    pack_error(capsys, cfg_file, ["--from_archive", str(archive), "--output", str(tmp_path / "s.h5")],
               f"member {member}", message)
    assert not (tmp_path / "s.h5").exists()


def test_features_of_another_model_or_setting_are_refused(tiny_data, tmp_path, capsys):
    wrong_channels = write_cfg(tiny_cfg(tiny_data, **{"model.change_detector.feat_dim": 1026}), tmp_path, "a.yaml")
    pack_error(capsys, wrong_channels, ["--from_folders", "--output", str(tmp_path / "a.h5")],
               "has features of 256 channels, so model.change_detector.feat_dim must be 258")
    other = write_cfg(tiny_cfg(tiny_data, **{"data.extraction.stage": 2}), tmp_path, "b.yaml")
    pack_error(capsys, other, ["--from_folders", "--output", str(tmp_path / "b.h5")],
               "holds features of resnet18 layer3", "the config expects resnet18 layer2")
    # A store packed for one setting is refused by a config of another, in the loader and the packer.
    good = write_cfg(tiny_cfg(tiny_data), tmp_path, "good.yaml")
    pack(good, tmp_path / "good.h5", "--from_folders")
    cli_error(capsys, train.main, ["--cfg", other, "data.feature_store", str(tmp_path / "good.h5")],
              f"the feature store data.feature_store = {tmp_path}/good.h5 holds features extracted with "
              "resnet18 layer3", "stage 3 (the config: 2)")
    pack_error(capsys, other, ["--from_images", "--output", str(tmp_path / "good.h5")],
               "good.h5 holds features of other extraction settings (stage 3 (the config: 2))")
    pack_error(capsys, good, ["--from_folders", "--output", str(tmp_path / "good.h5"), "--dtype", "float32"],
               "holds float16 features, and --dtype float32 was asked for")


def test_missing_store_and_missing_source_ids_are_clear(tiny_data, cfg_file, tmp_path, capsys):
    cli_error(capsys, train.main, ["--cfg", cfg_file, "data.feature_store", str(tmp_path / "none.h5")],
              f"data.feature_store: feature store {tmp_path}/none.h5 does not exist", "python scripts/pack_features.py")
    archive = tmp_path / "part.tar.gz"
    make_archive(tiny_data["root"], archive, only=30)
    pack_error(capsys, cfg_file, ["--from_archive", str(archive), "--output", str(tmp_path / "s.h5")],
               "the source lacks images of 30 wanted scene ids (features 10, sc_features 10, nsc_features 10)",
               "s.h5.partial")
    cli_error(capsys, train.main, ["--cfg", cfg_file, "data.feature_store", str(tmp_path / "s.h5")],
              "s.h5.partial is a pack that has not finished")
    (tmp_path / "s.h5.partial").write_bytes(b"garbage")
    pack_error(capsys, cfg_file, ["--from_folders", "--output", str(tmp_path / "s.h5")],
               "s.h5.partial, the unfinished pack of", "delete it and pack again")


def test_disk_space_is_checked_first_and_a_full_disk_keeps_the_partial_store(cfg_file, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from utils import feature_store

    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    monkeypatch.setattr(feature_store.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 10**5, 10**5))
    pack(cfg_file, tmp_path / "s.h5", "--from_folders", expect=2)
    err = capsys.readouterr().err
    assert "the store" in err and "needs 1 MB more" in err and "has 0 MB free" in err
    monkeypatch.setattr(feature_store.shutil, "disk_usage", real)
    original, writes = h5py.Dataset.__setitem__, [0]

    def full(self, key, value):
        writes[0] += 1
        if writes[0] > 40:
            raise OSError(28, "Can't write data (file write failed: errno = 28, error message = 'No space left on device')")
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    pack(cfg_file, tmp_path / "s.h5", "--from_folders", expect=2)
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert line.startswith("error: no space left in") and "kept in" in line and "it resumes" in line
    assert "Traceback" not in err and not (tmp_path / "s.h5").exists()
    monkeypatch.setattr(h5py.Dataset, "__setitem__", original)
    pack(cfg_file, tmp_path / "s.h5", "--from_folders")
    pack(cfg_file, tmp_path / "straight.h5", "--from_folders")
    assert_same_store(tmp_path / "straight.h5", tmp_path / "s.h5")


def test_a_second_packer_is_refused(cfg_file, tmp_path, capsys):
    lock = FileLock(str(tmp_path / "s.h5.lock"), "the store", "another packer", "wait", StoreError)
    lock.acquire()
    try:
        pack_error(capsys, cfg_file, ["--from_folders", "--output", str(tmp_path / "s.h5")],
                   f"the feature store {tmp_path}/s.h5 is in use by another packer (process {os.getpid()}",
                   "two packers cannot write one store")
    finally:
        lock.release()
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.partial").exists()


def test_flags_and_the_store_key_are_checked(cfg_file, tmp_path, capsys):
    for flags, message in ((["--batch_size", "0"], "--batch_size: must be at least 1"),
                           (["--dtype", "float64"], "invalid choice: 'float64'")):
        with pytest.raises(SystemExit) as stop:
            pack_main(["--cfg", cfg_file, "--from_folders", str(tmp_path), "--output", str(tmp_path / "s.h5"), *flags])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    cli_error(capsys, pack_main, ["--from_folders", str(tmp_path)],
              "the default config sets no data.feature_store: give the store's file with --output")
    with pytest.raises(SystemExit):
        pack_main(["--cfg", cfg_file])
    assert "one of the arguments --from_archive --from_folders --from_images is required" in capsys.readouterr().err
