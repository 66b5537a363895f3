"""The loader: batches, max_samples, swap augmentation, exact resume, and its clear errors."""
import json
import os
import re
import shutil

import h5py
import numpy as np
import pytest
import torch

from tests.helpers import tiny_cfg
from utils.dataset import DataError, RCCDataset, epoch_batches, stratified_subset, train_batches
from utils.text import CHANGE_TYPES, decode

CPU = torch.device("cpu")


def test_train_batch_layout(tiny_data):
    cfg = tiny_cfg(tiny_data, **{"data.train.seq_per_img": 3})
    ds = RCCDataset(cfg, "train")
    assert len(ds) == 34 and ds.feature_shape == (256, 4, 4) and len(ds.vocab) == 76
    batch = next(train_batches(ds, cfg, CPU))
    assert batch["d_feat"].shape == (4, 256, 4, 4) and batch["q_feat"].dtype == torch.float32
    for prefix in ("pos", "neg"):
        labels, masks = batch[prefix + "_labels"], batch[prefix + "_masks"]
        assert labels.shape == (4, 3, 24) and labels.dtype == torch.int64
        assert masks.dtype == torch.float32
        assert (labels[:, :, 0] == 2).all()
        # The mask covers <START> .. <END>; <NULL> (0) after it.
        ends = masks.sum(-1).long() - 1
        assert (labels.gather(2, ends.unsqueeze(-1)) == 3).all()
        assert ((labels != 0).float() == masks).all()
    assert all(0 <= t < len(CHANGE_TYPES) for t in batch["change_type"].tolist())
    assert batch["image_id"].dtype == torch.int64 and len(batch["q_img_path"]) == 4


def test_eval_split_uses_the_first_caption_and_a_subset_in_split_order(tiny_data):
    cfg = tiny_cfg(tiny_data, **{"data.test.max_samples": 3, "data.train.seq_per_img": 5})
    ds = RCCDataset(cfg, "test")
    with open(tiny_data["splits"]) as f:
        split = json.load(f)["test"]
    assert len(ds.ids) == 3 and ds.ids == [i for i in split if i in ds.ids]
    item = ds[0]
    assert item["pos_labels"].shape == (1, 24)
    with open(tiny_data["change_captions"]) as f:
        first = json.load(f)["CLEVR_default_%06d.png" % ds.ids[0]][0]
    assert decode(item["pos_labels"][0], ds.idx_to_word) == first
    with open(tiny_data["type_mapping"]) as f:
        mapping = json.load(f)
    assert "%06d.png" % ds.ids[0] in mapping[CHANGE_TYPES[item["change_type"]]]
    expected = np.load(os.path.join(tiny_data["sc_features"],
                                    "CLEVR_semantic_%06d.png.npy" % ds.ids[0]))
    assert np.array_equal(item["q_feat"].numpy(), expected)


@pytest.mark.parametrize("swap_prob", [0.0, 1.0])
def test_swap_augmentation(tiny_data, swap_prob):
    ds = RCCDataset(tiny_cfg(tiny_data, **{"data.swap_prob": swap_prob}), "train")
    item = ds[0]
    default = np.load(os.path.join(tiny_data["features"],
                                   "CLEVR_default_%06d.png.npy" % ds.ids[0]))
    distractor = np.load(os.path.join(tiny_data["nsc_features"],
                                      "CLEVR_nonsemantic_%06d.png.npy" % ds.ids[0]))
    d_expected, n_expected = (distractor, default) if swap_prob else (default, distractor)
    assert np.array_equal(item["d_feat"].numpy(), d_expected)
    assert np.array_equal(item["n_feat"].numpy(), n_expected)
    assert ("nonsemantic" in item["d_img_path"]) == bool(swap_prob)


def test_validation_never_swaps(tiny_data):
    ds = RCCDataset(tiny_cfg(tiny_data, **{"data.swap_prob": 1.0}), "val")
    assert "CLEVR_default_" in ds[0]["d_img_path"]


def _signature(ds):
    return [(bool("nonsemantic" in it["d_img_path"]), it["pos_labels"].tolist(),
             it["neg_labels"].tolist()) for it in (ds[i] for i in range(len(ds)))]


def test_set_epoch_is_deterministic(tiny_data):
    cfg = tiny_cfg(tiny_data, **{"data.train.seq_per_img": 2})
    a, b = RCCDataset(cfg, "train"), RCCDataset(cfg, "train")
    a.set_epoch(3)
    b.set_epoch(3)
    assert _signature(a) == _signature(b)
    b.set_epoch(4)
    assert _signature(a) != _signature(b)
    per_epoch = len(a) // cfg.data.train.batch_size

    def epoch(position):
        stream = train_batches(a, cfg, CPU, position)
        return [next(stream)["image_id"].tolist() for _ in range(per_epoch)]

    assert epoch(5 * per_epoch) == epoch(5 * per_epoch) and epoch(5 * per_epoch) != epoch(6 * per_epoch)
    # Resuming mid-epoch gives the batches an uninterrupted stream gives there.
    assert epoch(5 * per_epoch)[3:] == epoch(5 * per_epoch + 3)[:per_epoch - 3]
    assert epoch_batches(34, 4, seed=1, epoch=2) == epoch_batches(34, 4, seed=1, epoch=2)


def test_in_memory_matches_files(tiny_data):
    on_disk = RCCDataset(tiny_cfg(tiny_data, **{"data.swap_prob": 0.0}), "val")
    cached = RCCDataset(tiny_cfg(tiny_data, **{"data.swap_prob": 0.0,
                                               "data.in_memory": True}), "val")
    for key in ("d_feat", "n_feat", "q_feat"):
        assert torch.equal(on_disk[1][key], cached[1][key])


# ---------------------------------------------------------------------------- errors
@pytest.fixture
def copied(tiny_data, tmp_path):
    """A writable copy of the feature folders and label file; returns (paths, cfg maker)."""
    paths = dict(tiny_data)
    for key in ("features", "sc_features", "nsc_features", "h5", "splits"):
        target = str(tmp_path / os.path.basename(tiny_data[key]))
        (shutil.copytree if os.path.isdir(tiny_data[key]) else shutil.copy)(tiny_data[key], target)
        paths[key] = target
    return paths


def test_missing_feature_folder(copied):
    shutil.rmtree(copied["sc_features"])
    with pytest.raises(DataError, match="sc_features does not exist.*extract_features.py"):
        RCCDataset(tiny_cfg(copied), "train")


def test_missing_label_file_names_the_command(copied):
    os.remove(copied["h5"])
    with pytest.raises(DataError, match="preprocess_captions_transformer.py"):
        RCCDataset(tiny_cfg(copied), "train")


def test_feature_folders_with_different_ids(copied):
    os.remove(os.path.join(copied["nsc_features"], "CLEVR_nonsemantic_000005.png.npy"))
    with pytest.raises(DataError, match=r"different scene ids .*\[5\]"):
        RCCDataset(tiny_cfg(copied), "train")


def test_split_id_without_features(copied, tmp_path):
    with open(copied["splits"]) as f:
        splits = json.load(f)
    splits["train"].append(123)
    with open(copied["splits"], "w") as f:
        json.dump(splits, f)
    with pytest.raises(DataError, match=r"type_mapping.json has no change type for 1 ids .*\[123\]"):
        RCCDataset(tiny_cfg(copied), "train")
    with open(copied["type_mapping"]) as f:
        mapping = json.load(f)
    mapping["move"].append("000123.png")
    copied["type_mapping"] = str(tmp_path / "types.json")
    with open(copied["type_mapping"], "w") as f:
        json.dump(mapping, f)
    with pytest.raises(DataError, match=r"no feature file .*\[123\]"):
        RCCDataset(tiny_cfg(copied), "train")


def test_wrong_shape_checked_up_front_and_on_load(copied):
    ds_ids = RCCDataset(tiny_cfg(copied), "train").ids
    first = os.path.join(copied["sc_features"], "CLEVR_semantic_%06d.png.npy" % ds_ids[0])
    np.save(first, np.zeros((256, 2, 2), dtype=np.float32))
    with pytest.raises(DataError, match="disagree on the feature shape"):
        RCCDataset(tiny_cfg(copied), "train")
    np.save(first, np.zeros((256, 4, 4), dtype=np.float32))
    later = os.path.join(copied["features"], "CLEVR_default_%06d.png.npy" % ds_ids[1])
    np.save(later, np.zeros((256, 4, 4), dtype=np.float64))
    ds = RCCDataset(tiny_cfg(copied, **{"data.swap_prob": 0.0}), "train")
    with pytest.raises(DataError, match="float64"):
        ds[1]
    with open(later, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match="cannot be read"):
        ds[1]


def test_h5_lacking_a_dataset(copied):
    with h5py.File(copied["h5"], "a") as f:
        del f["neg_label_length"]
    with pytest.raises(DataError, match="neg_label_length"):
        RCCDataset(tiny_cfg(copied), "train")


def test_captions_longer_than_seq_length(tiny_data):
    with pytest.raises(DataError, match="model.speaker.seq_length"):
        RCCDataset(tiny_cfg(tiny_data, **{"model.speaker.seq_length": 8}), "train")


def test_empty_split_after_max_samples(tiny_data):
    with pytest.raises(DataError, match="max_samples"):
        RCCDataset(tiny_cfg(tiny_data, **{"data.val.max_samples": 0}), "val")


def grouped_split(counts, seed=0):
    """Ids grouped by change type like the real splits.json: the types' blocks in order, each shuffled."""
    rng = np.random.default_rng(seed)
    ids, types = [], []
    for t, count in enumerate(counts):
        block = list(range(t * 8000, t * 8000 + count))
        rng.shuffle(block)
        ids += block
        types += [t] * count
    return ids, types


def test_max_samples_keeps_the_change_types_of_a_grouped_split():
    ids, types = grouped_split([6764, 6768, 6771, 6766, 6761])  # the real train split
    type_of = dict(zip(ids, types))
    subset = stratified_subset(ids, types, 8500, seed=0)
    counts = [sum(type_of[i] == t for i in subset) for t in range(5)]
    # Shares of 8,500: 1699.53, 1700.54, 1701.28, 1700.03, 1698.77; the two largest remainders round up.
    assert counts == [1699, 1701, 1701, 1700, 1699]
    position = {i: k for k, i in enumerate(ids)}
    assert [position[i] for i in subset] == sorted(position[i] for i in subset)  # the split's own order
    assert stratified_subset(ids, types, 8500, seed=0) == subset  # deterministic
    assert stratified_subset(ids, types, 8500, seed=1) != subset
    # The same ids whatever order the split lists them in.
    shuffled = list(zip(ids, types))
    np.random.default_rng(5).shuffle(shuffled)
    again = stratified_subset([i for i, _ in shuffled], [t for _, t in shuffled], 8500, seed=0)
    assert sorted(again) == sorted(subset)
    val_ids, val_types = grouped_split([397, 398, 398, 398, 397])
    first = stratified_subset(val_ids, val_types, 400, seed=0)
    chosen = set(first)
    assert [sum(t == k for i, t in zip(val_ids, val_types) if i in chosen) for k in range(5)] == [80, 80, 80, 80, 80]
    assert stratified_subset(val_ids, val_types, 5000, seed=0) == val_ids


def test_the_loader_says_what_it_uses(tiny_data, capsys):
    RCCDataset(tiny_cfg(tiny_data, **{"data.train.max_samples": 10}), "train")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("data: train split, 10 of 34 scene ids (color ")
    assert sum(int(n) for n in re.findall(r"(?:color|material|add|drop|move) (\d+)", line)) == 10


def test_the_loader_benchmark_times_every_worker_count_cold_and_warm(tiny_data, tmp_path, capsys):
    from tests.helpers import write_cfg
    from utils.dataset import REFERENCE_SCENES_PER_S, main

    main(["--cfg", write_cfg(tiny_cfg(tiny_data), tmp_path), "--benchmark", "--scenes", "8", "--workers", "0", "1"])
    out = capsys.readouterr().out
    assert "loading 8 scenes of the train split from the feature folders, batches of 4 in training order:" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("0", "cold"), ("0", "warm"), ("1", "cold"), ("1", "warm")]
    for row in rows:  # 8 scenes of 3 float32 256 x 4 x 4 maps: 49,152 bytes a scene
        assert abs(float(row[3]) - float(row[2]) * 49152 / 1e6) <= 1 + 0.01 * float(row[3])
    assert f"consumes about {REFERENCE_SCENES_PER_S:.0f} scenes/s" in out and round(REFERENCE_SCENES_PER_S) == 178
