"""The CLEVR-Change loader used by train.py and test.py.

One item is one scene id: its "before" (d), distractor (n) and semantic-change (q) features,
change captions (pos_*) and no-change captions (neg_*). Ids map to files by the number in the
file name, so gaps in the ids are fine. All randomness of item i is drawn from a generator
seeded with (cfg.seed, epoch, i), which makes a resumed run see exactly the same data.
"""
import json
import os
import re

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

CHANGE_TYPES = ("color", "material", "add", "drop", "move")
SPLITS = ("train", "val", "test")
H5_KEYS = ("labels", "label_start_idx", "label_end_idx", "label_length",
           "neg_labels", "neg_label_start_idx", "neg_label_end_idx", "neg_label_length")

_FEATURE_ID = re.compile(r"(\d+)\.[A-Za-z]+\.npy$")
_TYPE_ID = re.compile(r"(\d+)")


class DataError(Exception):
    """Missing or inconsistent data; the message names the path or key and how to fix it."""

    def __init__(self, message):
        # A DataLoader worker re-raises this in the main process as "Caught DataError in
        # DataLoader worker ..." followed by the worker's traceback; the CLIs print messages
        # without tracebacks, so only the original message (after the last "DataError: ") is kept.
        if message.startswith("Caught DataError"):
            message = message.rstrip().rsplit("DataError: ", 1)[-1]
        super().__init__(message)


def _extract_cmd(img_dir, feat_dir):
    return (f"python scripts/extract_features.py --input_image_dir {img_dir} "
            f"--output_dir {feat_dir} --batch_size 128")


def _preprocess_cmd(cfg):
    d = os.path.dirname(cfg.data.splits_json) or "."
    return (f"python scripts/preprocess_captions_transformer.py --input_captions_json "
            f"{d}/change_captions.json --input_neg_captions_json {d}/no_change_captions.json "
            f"--input_image_dir {cfg.data.default_img_dir} --split_json {cfg.data.splits_json} "
            f"--output_vocab_json {cfg.data.vocab_json} --output_h5 {cfg.data.h5_label_file}")


_GET_DATA = ("unpack the data (tar -xzf clevr_change.tar.gz) or generate a synthetic set with "
             "python scripts/generate_synthetic_clevr.py --output_dir DIR")


def _load_json(path, key, fix):
    if not os.path.isfile(path):
        raise DataError(f"{key} = {path} does not exist; {fix}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{key} = {path} is not valid JSON ({err}); {fix}") from None


def _index_features(feat_dir, key, img_dir):
    """{scene id: file name} of one feature folder (one os.listdir, no stat per file)."""
    if not os.path.isdir(feat_dir):
        raise DataError(f"{key} = {feat_dir} does not exist; make it with: "
                        f"{_extract_cmd(img_dir, feat_dir)}")
    index = {}
    for name in os.listdir(feat_dir):
        match = _FEATURE_ID.search(name)
        if match:
            index[int(match.group(1))] = name
    if not index:
        raise DataError(f"{key} = {feat_dir} holds no feature files (<image name>.npy); make "
                        f"them with: {_extract_cmd(img_dir, feat_dir)}")
    return index


def _read_feature(path, shape=None):
    """float32 array of ``path``; DataError when unreadable or not of ``shape``."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"feature file {path} cannot be read ({err}); delete it and re-run "
                        f"scripts/extract_features.py (it resumes)") from None
    if arr.dtype != np.float32 or arr.ndim != 3 or (shape is not None and arr.shape != shape):
        want = f"float32 {shape}" if shape is not None else "float32 (C, H, W)"
        raise DataError(f"feature file {path} is {arr.dtype} {arr.shape}, expected {want}; "
                        f"re-extract it with scripts/extract_features.py")
    return arr


class RCCDataset(Dataset):
    """Scene ids of one split, with features and encoded captions (see the module doc)."""

    def __init__(self, cfg, split):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        self.cfg = cfg
        self.split = split
        self.epoch = 0
        data = cfg.data
        self.seq_length = cfg.model.speaker.seq_length
        self.seq_per_img = data.train.seq_per_img if split == "train" else 1
        self.swap_prob = data.swap_prob if split == "train" else 0.0

        self.vocab = _load_json(data.vocab_json, "data.vocab_json",
                                f"make it with: {_preprocess_cmd(cfg)}")
        self.idx_to_word = {int(i): w for w, i in self.vocab.items()}
        splits = _load_json(data.splits_json, "data.splits_json", _GET_DATA)
        if split not in splits:
            raise DataError(f"data.splits_json = {data.splits_json} has no '{split}' list")
        ids = [int(i) for i in splits[split]]
        max_samples = getattr(data, split).max_samples
        if max_samples >= 0:
            ids = ids[:max_samples]
        if not ids:
            raise DataError(f"split '{split}' is empty (data.{split}.max_samples = {max_samples},"
                            f" {len(splits[split])} ids in {data.splits_json}); use a positive "
                            f"max_samples or -1 for all")

        # Features: one listing per folder; the three folders must hold the same ids.
        folders = (("data.default_feature_dir", data.default_feature_dir, data.default_img_dir),
                   ("data.nonsemantic_feature_dir", data.nonsemantic_feature_dir,
                    data.nonsemantic_img_dir),
                   ("data.semantic_feature_dir", data.semantic_feature_dir, data.semantic_img_dir))
        indexes = [_index_features(path, key, img) for key, path, img in folders]
        for (key, path, img), index in zip(folders[1:], indexes[1:]):
            if index.keys() != indexes[0].keys():
                only_a = sorted(indexes[0].keys() - index.keys())
                only_b = sorted(index.keys() - indexes[0].keys())
                raise DataError(
                    f"{key} = {path} and data.default_feature_dir = {data.default_feature_dir} "
                    f"hold different scene ids ({len(only_a)} only in the default folder, e.g. "
                    f"{only_a[:5]}; {len(only_b)} only in {path}, e.g. {only_b[:5]}); "
                    f"finish the extraction with: {_extract_cmd(img, path)}")
        missing = [i for i in ids if i not in indexes[0]]
        if missing:
            raise DataError(f"{len(missing)} ids of split '{split}' have no feature file in "
                            f"{data.default_feature_dir} (e.g. {missing[:5]}); extract them with: "
                            f"{_extract_cmd(data.default_img_dir, data.default_feature_dir)}")
        self.ids = ids
        self.feature_files = [[os.path.join(path, index[i]) for i in ids]
                              for (_, path, _), index in zip(folders, indexes)]
        img_dirs = [img for _, _, img in folders]
        self.image_files = [[os.path.join(img_dir, index[i][:-len(".npy")]) for i in ids]
                            for img_dir, index in zip(img_dirs, indexes)]

        # Check one file per folder up front: shape and dtype must agree.
        shapes = [_read_feature(files[0]).shape for files in self.feature_files]
        if len(set(shapes)) != 1:
            raise DataError(f"feature folders disagree on the feature shape: "
                            f"{dict(zip([f[0] for f in self.feature_files], shapes))}; "
                            f"re-extract them with the same settings")
        self.feature_shape = shapes[0]

        self._load_labels()
        self._load_types()
        self._cache = None
        if data.in_memory:
            self._cache = [np.stack([_read_feature(f, self.feature_shape) for f in files])
                           for files in self.feature_files]

    def _load_labels(self):
        path = self.cfg.data.h5_label_file
        if not os.path.isfile(path):
            raise DataError(f"data.h5_label_file = {path} does not exist; make it with: "
                            f"{_preprocess_cmd(self.cfg)}")
        try:
            with h5py.File(path, "r") as f:
                absent = [k for k in H5_KEYS if k not in f]
                if absent:
                    raise DataError(f"data.h5_label_file = {path} lacks the dataset(s) {absent};"
                                    f" rebuild it with: {_preprocess_cmd(self.cfg)}")
                h5 = {k: f[k][()] for k in H5_KEYS}
        except OSError as err:
            raise DataError(f"data.h5_label_file = {path} cannot be read ({err}); rebuild it "
                            f"with: {_preprocess_cmd(self.cfg)}") from None
        for prefix in ("", "neg_"):
            width = h5[prefix + "labels"].shape[1]
            if width > self.seq_length:
                raise DataError(f"{path}: {prefix}labels hold captions of {width} tokens, longer "
                                f"than model.speaker.seq_length = {self.seq_length}; raise "
                                f"model.speaker.seq_length to at least {width}")
            starts = h5[prefix + "label_start_idx"]
            without = [i for i in self.ids if i >= len(starts) or starts[i] < 0]
            if without:
                raise DataError(f"{path}: {len(without)} ids of split '{self.split}' have no "
                                f"{'no-change' if prefix else 'change'} captions (e.g. "
                                f"{without[:5]}); rebuild it with: {_preprocess_cmd(self.cfg)}")
        self.labels = h5

    def _load_types(self):
        path = self.cfg.data.type_mapping_json
        mapping = _load_json(path, "data.type_mapping_json", _GET_DATA)
        type_of = {}
        for t, names in mapping.items():
            if t not in CHANGE_TYPES:
                raise DataError(f"data.type_mapping_json = {path}: unknown change type '{t}' "
                                f"(expected {CHANGE_TYPES})")
            for name in names:
                type_of[int(_TYPE_ID.search(name).group(1))] = CHANGE_TYPES.index(t)
        missing = [i for i in self.ids if i not in type_of]
        if missing:
            raise DataError(f"data.type_mapping_json = {path} has no change type for {len(missing)}"
                            f" ids of split '{self.split}' (e.g. {missing[:5]})")
        self.change_types = [type_of[i] for i in self.ids]

    def set_epoch(self, epoch):
        """Items drawn after this call depend on (cfg.seed, epoch, index) only."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.ids)

    def _features(self, folder, i):
        if self._cache is not None:
            return torch.from_numpy(self._cache[folder][i])
        return torch.from_numpy(_read_feature(self.feature_files[folder][i], self.feature_shape))

    def _captions(self, rng, scene_id, prefix):
        start = int(self.labels[prefix + "label_start_idx"][scene_id])
        end = int(self.labels[prefix + "label_end_idx"][scene_id])
        if self.split == "train":
            rows = start + rng.integers(0, end - start + 1, size=self.seq_per_img)
        else:
            rows = np.array([start])
        labels = np.zeros((len(rows), self.seq_length), dtype=np.int64)
        source = self.labels[prefix + "labels"][rows]
        labels[:, :source.shape[1]] = source
        lengths = self.labels[prefix + "label_length"][rows]
        masks = (np.arange(self.seq_length)[None, :] < lengths[:, None]).astype(np.float32)
        return torch.from_numpy(labels), torch.from_numpy(masks)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.cfg.seed, self.epoch, i])
        scene_id = self.ids[i]
        d_feat, n_feat, q_feat = (self._features(k, i) for k in range(3))
        d_path, n_path, q_path = (self.image_files[k][i] for k in range(3))
        # Both d and n show the unchanged scene; swapping them is the reference augmentation.
        if self.swap_prob > 0 and rng.random() < self.swap_prob:
            d_feat, n_feat = n_feat, d_feat
            d_path, n_path = n_path, d_path
        pos_labels, pos_masks = self._captions(rng, scene_id, "")
        neg_labels, neg_masks = self._captions(rng, scene_id, "neg_")
        return {"d_feat": d_feat, "n_feat": n_feat, "q_feat": q_feat,
                "pos_labels": pos_labels, "pos_masks": pos_masks,
                "neg_labels": neg_labels, "neg_masks": neg_masks,
                "image_id": scene_id, "change_type": self.change_types[i],
                "d_img_path": d_path, "n_img_path": n_path, "q_img_path": q_path}


def build_dataloader(cfg, split, shuffle, epoch_seed=None, dataset=None):
    """DataLoader over RCCDataset(cfg, split).

    ``epoch_seed`` (e.g. the epoch number) fixes both the shuffling order and the per-item
    randomness, so that a resumed run can rebuild the exact loader of an epoch; pass an existing
    ``dataset`` to avoid indexing the folders again.
    """
    dataset = dataset if dataset is not None else RCCDataset(cfg, split)
    epoch = 0 if epoch_seed is None else int(epoch_seed)
    dataset.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(int(cfg.seed) * 1_000_003 + epoch)
    return DataLoader(dataset, batch_size=getattr(cfg.data, split).batch_size, shuffle=shuffle,
                      num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                      drop_last=split == "train", generator=generator)


def main(argv=None):
    """`python -m utils.dataset --cfg FILE [--split S] [KEY VALUE ...]`: iterate the loader once and report."""
    import argparse
    import sys
    import time

    from configs.defaults import ConfigError, load_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.cfg, args.opts)
        start = time.time()
        dataset = RCCDataset(cfg, args.split)
        print(f"{args.split}: {len(dataset)} scene ids, features {dataset.feature_shape}, "
              f"vocabulary {len(dataset.vocab)}; indexed in {time.time() - start:.2f} s")
        start, count = time.time(), 0
        for batch in build_dataloader(cfg, args.split, shuffle=args.split == "train", dataset=dataset):
            if count == 0:
                print("first batch: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items()
                                                  if torch.is_tensor(v)))
            count += len(batch["image_id"])
        print(f"iterated {count} scene ids in {time.time() - start:.1f} s")
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
