"""The real CLEVR-Change layout at full size (slow): 39,803 scene ids, real file names, splits grouped by
change type as in the real splits.json, three feature folders of float32 1024 x 14 x 14 files.

The feature files of a folder are hard links to one file (2.4 MB on disk instead of 96 GB; one file
per folder because a file takes at most 65,000 links on ext4) and the images hard links to a small PNG.
The test builds the labels with the assignment's preprocessing command and the reference captions with
scripts/make_reference_captions.py, then indexes the loader, loads one batch of the quick config, and
trains the quick config for three iterations. Then it writes the features archive of that layout
(clevr_change_features.tar.gz: 119,409 members, 96 GB once decompressed; the features are zero but for
one channel, so that it compresses to a few hundred MB), packs the quick config's float16 store out of
it as a stream (17 GB written), and trains three iterations from the store. It prints the time of each
step (pytest -s shows them) and needs about 18 GB of free disk.
"""
import gzip
import json
import os
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_cli_error, run_cli
from utils.text import CHANGE_TYPES

pytestmark = [pytest.mark.slow, pytest.mark.snippets]

# DATA.md: per change type (color, material, add, drop, move) and split; each type owns 8,000 ids.
COUNTS = {"train": (6764, 6768, 6771, 6766, 6761), "val": (397, 398, 398, 398, 397), "test": (797,) * 5}
FOLDERS = (("images", "features", "CLEVR_default_%06d.png"), ("sc_images", "sc_features", "CLEVR_semantic_%06d.png"),
           ("nsc_images", "nsc_features", "CLEVR_nonsemantic_%06d.png"))
CAPTIONS = {"color": "the small red metal cube turned blue", "material": "the large gray sphere became shiny",
            "add": "a tiny cyan cylinder has been newly placed", "drop": "the big purple thing is missing",
            "move": "the yellow rubber block changed its location"}


def build_layout(root):
    """The real layout under root/data; returns {split: ids} (each list grouped by type, shuffled inside)."""
    rng = np.random.default_rng(0)
    data = root / "data"
    splits, types = {split: [] for split in COUNTS}, {t: [] for t in CHANGE_TYPES}
    for k, change in enumerate(CHANGE_TYPES):
        needed = sum(COUNTS[split][k] for split in COUNTS)
        block = rng.choice(np.arange(k * 8000, (k + 1) * 8000), size=needed, replace=False)  # ids with gaps
        start = 0
        for split in COUNTS:
            part = [int(i) for i in block[start:start + COUNTS[split][k]]]
            splits[split] += part  # grouped by type in the order color, material, add, drop, move
            start += COUNTS[split][k]
        types[change] = sorted(int(i) for i in block)
    ids = sorted(i for split in splits.values() for i in split)
    assert len(ids) == 39803

    data.mkdir(parents=True)
    for k, (images, features, pattern) in enumerate(FOLDERS):
        feature, image = data / f"{features}.npy", data / f"{images}.png"
        values = np.zeros((1024, 14, 14), np.float32)  # compressible, as an archive of it must be
        values[k] = np.random.default_rng(k).standard_normal((14, 14))
        np.save(feature, values)
        Image.new("RGB", (48, 32), (120, 120, 120)).save(image)
        (data / images).mkdir()
        (data / features).mkdir()
        for i in ids:
            os.link(image, data / images / (pattern % i))
            os.link(feature, data / features / ((pattern % i) + ".npy"))
    change_of = {i: change for change, members in types.items() for i in members}
    change = {FOLDERS[0][2] % i: [CAPTIONS[change_of[i]], "there is a difference"] for i in ids}
    no_change = {FOLDERS[0][2] % i: ["nothing has changed"] for i in ids}
    for name, value in (("change_captions.json", change), ("no_change_captions.json", no_change),
                        ("splits.json", splits),
                        ("type_mapping.json", {t: [f"{i:06d}.png" for i in types[t]] for t in CHANGE_TYPES})):
        (data / name).write_text(json.dumps(value))
    return splits


def write_features_archive(data, path):
    """data/clevr_change_features.tar.gz of the three feature folders, as `cd data && tar -czf ... features
    sc_features nsc_features` would write it. Each folder's files are one file, so the archive is written
    as concatenated gzip members (a valid .tar.gz) with each folder's compressed content made once."""
    with open(path, "wb") as out:
        for _, features, pattern in FOLDERS:
            payload = (data / f"{features}.npy").read_bytes()
            body = gzip.compress(payload + b"\0" * (-len(payload) % 512), compresslevel=6, mtime=0)
            for name in sorted(os.listdir(data / features)):
                info = tarfile.TarInfo(f"{features}/{name}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                out.write(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT), mtime=0))
                out.write(body)
        out.write(gzip.compress(b"\0" * 1024, mtime=0))  # the end-of-archive blocks


def test_full_size_layout_index_batch_and_three_iterations(tmp_path, capsys):
    times = {}
    start = time.time()
    splits = build_layout(tmp_path)
    times["build the layout (3 x 39,803 hard links)"] = time.time() - start

    def timed(what, *command, timeout=1800):
        begin = time.time()
        done = run_cli(*command, cwd=tmp_path, timeout=timeout)
        times[what] = time.time() - begin
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    timed("preprocess captions (assignment command)", os.path.join(root, "scripts/preprocess_captions_transformer.py"),
          "--input_captions_json", "./data/change_captions.json", "--input_neg_captions_json",
          "./data/no_change_captions.json", "--input_image_dir", "./data/images", "--split_json", "./data/splits.json",
          "--output_vocab_json", "./data/transformer_vocab.json", "--output_h5", "./data/transformer_labels.h5")
    timed("build total_change_captions_reformat.json", os.path.join(root, "scripts/make_reference_captions.py"),
          "--input_captions_json", "./data/change_captions.json", "--input_neg_captions_json",
          "./data/no_change_captions.json", "--output_json", "./data/total_change_captions_reformat.json")

    quick = os.path.join(root, "configs/dynamic/transformer_quick.yaml")
    cpu = ["gpu_id", "-1", "data.num_workers", "2"]
    loose = [*cpu, "data.feature_store", ""]  # the feature folders, not the store the quick config names
    # The quick config's train subset keeps every change type in its share of the split.
    done = timed("index the train split and iterate one epoch of 8,500 ids (python -m utils.dataset)",
                 "-m", "utils.dataset", "--cfg", quick, *loose)
    line = next(line for line in done.stdout.splitlines() if line.startswith("data: train split"))
    assert line == "data: train split, 8,500 of 33,830 scene ids (color 1,699, material 1,701, add 1,701, " \
                   "drop 1,700, move 1,699)", line
    assert "first batch: d_feat (128, 1024, 14, 14)" in done.stdout
    done = timed("index the val split, first 400 ids (python -m utils.dataset)", "-m", "utils.dataset", "--cfg",
                 quick, "--split", "val", "data.val.max_samples", "400", *loose)
    assert "400 of 1,988 scene ids (color 80, material 80, add 80, drop 80, move 80)" in done.stdout

    timed("train the quick config for 3 iterations (batch 128, paper model, CPU)",
          os.path.join(root, "train.py"), "--cfg", quick, "train.max_iter", "3", "train.snapshot_interval", "3",
          "data.val.max_samples", "20", "logger.visdom", "False", *loose)
    snapshot = tmp_path / "experiments" / "SCORER+CBR_quick" / "snapshots" / "SCORER+CBR_quick_checkpoint_3.pt"
    assert snapshot.exists()
    # The assignment's literal test command, after the quick run on a machine without that GPU or
    # snapshot, prints the command that works.
    assert_cli_error(run_cli(os.path.join(root, "test.py"), "--cfg", os.path.join(root, "configs/dynamic/transformer.yaml"),
                             "--snapshot", "10000", "--gpu", "-1", cwd=tmp_path),
                     "no snapshots in experiments/SCORER+CBR", "--snapshot best")
    # The compact path: the quick config's store streamed out of the features archive, and training from it.
    start = time.time()
    archive = tmp_path / "data" / "clevr_change_features.tar.gz"
    write_features_archive(tmp_path / "data", archive)
    times[f"write clevr_change_features.tar.gz ({os.path.getsize(archive) / 1e6:.0f} MB)"] = time.time() - start
    done = timed("pack the quick config's store from the archive (python scripts/pack_features.py)",
                 os.path.join(root, "scripts/pack_features.py"), "--cfg", quick, "--from_archive",
                 "data/clevr_change_features.tar.gz", *cpu)
    store = tmp_path / "data" / "clevr_change_quick.h5"
    assert f"wrote data/clevr_change_quick.h5: 14,473 scene ids x 3 images, float16 (1024, 14, 14)" in done.stdout
    assert 17.0e9 < os.path.getsize(store) < 17.7e9
    timed("train the quick config for 3 iterations from the store", os.path.join(root, "train.py"), "--cfg", quick,
          "train.max_iter", "3", "train.snapshot_interval", "3", "data.val.max_samples", "20", "logger.visdom",
          "False", "exp_name", "from_store", *cpu)
    assert (tmp_path / "experiments" / "from_store" / "snapshots" / "from_store_checkpoint_3.pt").exists()
    with capsys.disabled():
        print("\nfull-size layout, seconds per step:")
        for what, seconds in times.items():
            print(f"  {seconds:8.1f}  {what}")
    assert len(splits["train"]) == 33830
