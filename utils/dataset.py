"""The CLEVR-Change loader used by train.py, test.py and the other tools.

One item is one scene id: its "before" (d), distractor (n) and semantic-change (q) features,
change captions (pos_*) and no-change captions (neg_*). Ids map to files by the number in the
file name, so gaps in the ids are fine. All randomness of item i is drawn from a generator
seeded with (cfg.seed, epoch, i), and the training batches of an epoch are a function of
(cfg.seed, epoch): a resumed run sees exactly the same data.

    python -m utils.dataset --cfg FILE [--split S] [KEY VALUE ...]   # iterate a split's loader once
"""
import os
import re
import shlex
import time
import warnings

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from configs.defaults import ConfigError, get_cfg_defaults, get_key, load_config, shipped_configs
from utils import distributed
from utils.errors import UserError
from utils.extraction import describe_settings, read_stamp, settings_differences, settings_from_config
from utils.feature_store import FEATURE_SETS, FeatureStore, StoreError, load_feature
from utils.fileio import files_by_id, read_json
from utils.text import CHANGE_TYPES, SPECIAL_TOKENS

SPLITS = ("train", "val", "test")
H5_KEYS = ("labels", "label_start_idx", "label_end_idx", "label_length",
           "neg_labels", "neg_label_start_idx", "neg_label_end_idx", "neg_label_length")

_FEATURE_ID = re.compile(r"(\d+)\.[A-Za-z]+\.npy$")
_TYPE_ID = re.compile(r"(\d+)")


class DataError(UserError):
    """Missing or inconsistent data; the message names the path or key and how to fix it."""

    def __init__(self, message):
        # A DataLoader worker re-raises this in the main process as "Caught DataError in
        # DataLoader worker ..." followed by the worker's traceback; the CLIs print messages
        # without tracebacks, so only the original message (after the last "DataError: ") is kept.
        if message.startswith("Caught DataError"):
            message = message.rstrip().rsplit("DataError: ", 1)[-1]
        super().__init__(message)


# What the commands that errors print put where the config file is not known.
YOUR_CONFIG = "<your config>"
FEATURES_ARCHIVE = "clevr_change_features.tar.gz"


def _settings_config(cfg, origin):
    """The config file whose data.extraction is cfg's: the one cfg was loaded from (``origin``: (config file,
    KEY VALUE overrides), None when not known), else a shipped config of the same settings, else None."""
    if origin is not None and origin[0] is not None:
        return origin[0]
    wanted = settings_from_config(cfg.data.extraction)
    for path in shipped_configs():
        try:
            if settings_from_config(load_config(path).data.extraction) == wanted:
                return path
        except ConfigError:
            continue
    return None


def _extract_cmd(img_dir, feat_dir, cfg, origin=None):
    """The extraction command of one folder, with --cfg of a config of cfg's extraction settings (the defaults
    need none)."""
    command = (f"python scripts/extract_features.py --input_image_dir {shlex.quote(img_dir)} "
               f"--output_dir {shlex.quote(feat_dir)} --batch_size 128")
    if settings_from_config(cfg.data.extraction) == settings_from_config(get_cfg_defaults().data.extraction):
        return command
    config = _settings_config(cfg, origin)
    return command + f" --cfg {shlex.quote(config) if config is not None else YOUR_CONFIG}"


def _preprocess_cmd(cfg):
    d = os.path.dirname(cfg.data.splits_json) or "."
    return (f"python scripts/preprocess_captions_transformer.py --input_captions_json "
            f"{d}/change_captions.json --input_neg_captions_json {d}/no_change_captions.json "
            f"--input_image_dir {cfg.data.default_img_dir} --split_json {cfg.data.splits_json} "
            f"--output_vocab_json {cfg.data.vocab_json} --output_h5 {cfg.data.h5_label_file}")


def _pack_source(cfg):
    """--from_folders DIR when cfg's three feature folders are DIR/features, DIR/sc_features and DIR/nsc_features
    and exist, else --from_archive of the features archive."""
    folders = [os.path.normpath(get_key(cfg, s.feature_key)) for s in FEATURE_SETS]
    root = os.path.dirname(folders[0])
    if all(folder == os.path.join(root, s.name) and os.path.isdir(folder) for folder, s in zip(folders, FEATURE_SETS)):
        return f"--from_folders {shlex.quote(root or '.')}"
    return f"--from_archive {FEATURES_ARCHIVE}"


def _pack_cmd(cfg, origin=None):
    """The pack command of cfg's store: with the config and KEY VALUE overrides cfg was loaded from (``origin``:
    (config file, overrides), None when not known), else with the shipped config that names this store, else
    with --output."""
    head = "python scripts/pack_features.py --cfg"
    if origin is not None and origin[0] is not None:
        return " ".join([head, *map(shlex.quote, [origin[0], *origin[1]]), _pack_source(cfg)])
    for path in shipped_configs():
        try:
            if load_config(path).data.feature_store == cfg.data.feature_store:
                return f"{head} {shlex.quote(path)} {_pack_source(cfg)}"
        except ConfigError:
            continue
    return f"{head} {YOUR_CONFIG} --output {shlex.quote(cfg.data.feature_store)} {_pack_source(cfg)}"


_GET_DATA = ("unpack the data (see the README, 'Data') or generate a synthetic set with "
             "python scripts/generate_synthetic_clevr.py --output_dir DIR")


def _load_json(path, key, fix):
    return read_json(path, f"{key} =", fix, DataError)


def check_splits(splits, path):
    """The split lists hold integer ids, none twice, none in two splits."""
    if not isinstance(splits, dict):
        raise DataError(f"data.splits_json = {path} must hold {{\"train\": [ids], \"val\": [...], \"test\": [...]}}")
    earlier = {}
    for split, ids in splits.items():
        if not isinstance(ids, list) or not all(isinstance(i, int) or (isinstance(i, str) and i.isdigit()) for i in ids):
            raise DataError(f"data.splits_json = {path}: '{split}' must be a list of integer scene ids")
        seen, twice = set(), []
        for i in map(int, ids):
            if i in seen:
                twice.append(i)
            seen.add(i)
        if twice:
            raise DataError(f"data.splits_json = {path}: split '{split}' lists {len(twice)} id(s) twice "
                            f"(e.g. {twice[:5]}); each scene id may appear once")
        for other, other_ids in earlier.items():
            shared = sorted(seen & other_ids)
            if shared:
                raise DataError(f"data.splits_json = {path}: {len(shared)} id(s) are in both '{other}' and "
                                f"'{split}' (e.g. {shared[:5]}); a scene belongs to one split")
        earlier[split] = seen


def check_vocab(vocab, path):
    """A word -> index bijection onto 0..V-1 with the special tokens at 0-3."""
    if not isinstance(vocab, dict) or not all(isinstance(w, str) and isinstance(i, int) for w, i in vocab.items()):
        raise DataError(f"data.vocab_json = {path} must map words to integer indices")
    for token, index in SPECIAL_TOKENS.items():
        if vocab.get(token) != index:
            raise DataError(f"data.vocab_json = {path}: {token} must have index {index} (found "
                            f"{vocab.get(token)}); rebuild it with scripts/preprocess_captions_transformer.py")
    by_index = {}
    for word, index in vocab.items():
        if index in by_index:
            raise DataError(f"data.vocab_json = {path}: index {index} belongs to both {by_index[index]!r} and "
                            f"{word!r}; every word needs its own index (rebuild the vocabulary)")
        by_index[index] = word
    if sorted(by_index) != list(range(len(vocab))):
        gap = next(i for i in range(len(vocab) + 1) if i not in by_index)
        raise DataError(f"data.vocab_json = {path}: the indices must run from 0 to {len(vocab) - 1} without gaps "
                        f"(no word has index {gap}); rebuild the vocabulary")


def _index_features(feat_dir, key, img_dir, extract_cmd):
    """{scene id: file name} of one feature folder (one os.listdir, no stat per file); extract_cmd(img_dir,
    feat_dir): the command that makes the folder."""
    if not os.path.isdir(feat_dir):
        raise DataError(f"{key} = {feat_dir} does not exist; make it with: {extract_cmd(img_dir, feat_dir)}")
    index = files_by_id(feat_dir, _FEATURE_ID)
    if not index:
        raise DataError(f"{key} = {feat_dir} holds no feature files (<image name>.npy); make "
                        f"them with: {extract_cmd(img_dir, feat_dir)}")
    return index


def _read_feature(path, shape=None):
    """float32 array of ``path``; DataError when unreadable, not of ``shape`` or not finite."""
    return load_feature(path, f"feature file {path}", "delete it and re-run scripts/extract_features.py (it resumes)",
                        shape, DataError)


def check_feature_shape(cfg, shape, where):
    """DataError when features of ``shape`` (C, H, W), found in ``where``, do not fit the model of cfg."""
    channels, height, width = shape
    enc = cfg.model.change_detector
    if channels + 2 != enc.feat_dim:
        raise DataError(f"{where} has features of {channels} channels, so model.change_detector.feat_dim must be "
                        f"{channels + 2} (channels + 2 coordinates), not {enc.feat_dim}: are these the features "
                        f"this config was made for?")
    if max(height, width) > enc.grid:
        raise DataError(f"{where} has features on a {height}x{width} grid; set model.change_detector.grid to at "
                        f"least {max(height, width)}")


def stratified_subset(ids, types, size, seed):
    """``size`` of ``ids`` with each change type in its share of the whole list, in the list's order.

    The real splits list their ids grouped by change type, so the first N ids are not a sample.
    Each type gets floor(size * share), the largest remainders one more; which ids of a type is
    drawn with ``seed`` (and the type), the same whatever order the list is in.
    """
    if size >= len(ids):
        return list(ids)
    by_type = {t: [i for i, ti in zip(ids, types) if ti == t] for t in sorted(set(types))}
    exact = {t: size * len(members) / len(ids) for t, members in by_type.items()}
    quota = {t: int(e) for t, e in exact.items()}
    for t in sorted(exact, key=lambda t: (quota[t] - exact[t], t))[:size - sum(quota.values())]:
        quota[t] += 1
    chosen = set()
    for t, members in by_type.items():
        members = sorted(members)
        order = np.random.default_rng([seed, t]).permutation(len(members))
        chosen.update(members[k] for k in order[:quota[t]])
    return [i for i in ids if i in chosen]


def select_ids(cfg, split):
    """(ids, change type index of each, number of ids in the split): the scene ids of ``split`` that cfg uses
    (all, or the stratified subset of data.<split>.max_samples), in the split's order."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    data = cfg.data
    splits = _load_json(data.splits_json, "data.splits_json", _GET_DATA)
    check_splits(splits, data.splits_json)
    if split not in splits:
        raise DataError(f"data.splits_json = {data.splits_json} has no '{split}' list")
    all_ids = [int(i) for i in splits[split]]
    type_of = load_types(cfg, all_ids, split)
    max_samples = getattr(data, split).max_samples
    ids = all_ids if max_samples < 0 else stratified_subset(
        all_ids, [type_of[i] for i in all_ids], max_samples, data.subset_seed)
    if not ids:
        raise DataError(f"split '{split}' is empty (data.{split}.max_samples = {max_samples},"
                        f" {len(all_ids)} ids in {data.splits_json}); use a positive "
                        f"max_samples or -1 for all")
    return ids, [type_of[i] for i in ids], len(all_ids)


def load_types(cfg, ids, split):
    """{scene id: change type index} from data.type_mapping_json, which must cover ``ids`` of ``split``."""
    path = cfg.data.type_mapping_json
    mapping = _load_json(path, "data.type_mapping_json", _GET_DATA)
    if not isinstance(mapping, dict):
        raise DataError(f"data.type_mapping_json = {path} must map change types to lists of image names")
    type_of = {}
    for t, names in mapping.items():
        if t not in CHANGE_TYPES:
            raise DataError(f"data.type_mapping_json = {path}: unknown change type '{t}' "
                            f"(expected {CHANGE_TYPES})")
        for name in names:
            type_of[int(_TYPE_ID.search(name).group(1))] = CHANGE_TYPES.index(t)
    missing = [i for i in ids if i not in type_of]
    if missing:
        raise DataError(f"data.type_mapping_json = {path} has no change type for {len(missing)}"
                        f" ids of split '{split}' (e.g. {missing[:5]})")
    return type_of


def _check_settings(found, cfg, where, fix):
    """DataError when features of ``where`` were extracted with other settings than cfg's data.extraction."""
    expected = settings_from_config(cfg.data.extraction)
    if found is not None and found != expected:
        raise DataError(f"{where} holds features extracted with {describe_settings(found)}, but the config expects "
                        f"{describe_settings(expected)} (data.extraction: {settings_differences(found, expected)}); "
                        f"{fix}")


# The order of the three images of an item: before (d), distractor (n), semantic change (q).
LOADER_SETS = (FEATURE_SETS[0], FEATURE_SETS[2], FEATURE_SETS[1])


class FolderFeatures:
    """The three feature folders of the config: one .npy file per image, one listing per folder."""

    def __init__(self, cfg, split, ids, origin=None):
        data = cfg.data

        def extract_cmd(img_dir, feat_dir):
            return _extract_cmd(img_dir, feat_dir, cfg, origin)

        folders = [(s.feature_key, get_key(cfg, s.feature_key), get_key(cfg, s.image_key)) for s in LOADER_SETS]
        indexes = [_index_features(path, key, img, extract_cmd) for key, path, img in folders]
        for (key, path, img), index in zip(folders[1:], indexes[1:]):
            if index.keys() != indexes[0].keys():
                only_a = sorted(indexes[0].keys() - index.keys())
                only_b = sorted(index.keys() - indexes[0].keys())
                raise DataError(
                    f"{key} = {path} and data.default_feature_dir = {data.default_feature_dir} "
                    f"hold different scene ids ({len(only_a)} only in the default folder, e.g. "
                    f"{only_a[:5]}; {len(only_b)} only in {path}, e.g. {only_b[:5]}); "
                    f"finish the extraction with: {extract_cmd(img, path)}")
        missing = [i for i in ids if i not in indexes[0]]
        if missing:
            raise DataError(f"{len(missing)} ids of split '{split}' have no feature file in "
                            f"{data.default_feature_dir} (e.g. {missing[:5]}); extract them with: "
                            f"{extract_cmd(data.default_img_dir, data.default_feature_dir)}")
        for key, path, img in folders:
            _check_settings(read_stamp(path), cfg, f"{key} = {path}",
                            f"move it away and extract it again with: {extract_cmd(img, path)}, or set "
                            f"data.extraction to its settings")
        self.files = [[os.path.join(path, index[i]) for i in ids] for (_, path, _), index in zip(folders, indexes)]
        self.image_files = [[os.path.join(img_dir, index[i][:-len(".npy")]) for i in ids]
                            for (_, _, img_dir), index in zip(folders, indexes)]
        # One file per folder up front: shape and dtype must agree.
        shapes = [_read_feature(files[0]).shape for files in self.files]
        if len(set(shapes)) != 1:
            raise DataError(f"feature folders disagree on the feature shape: "
                            f"{dict(zip([f[0] for f in self.files], shapes))}; "
                            f"re-extract them with the same settings")
        self.shape, self.dtype = shapes[0], np.dtype(np.float32)

    def read(self, k, i):
        return _read_feature(self.files[k][i], self.shape)


class StoreFeatures:
    """The feature store of data.feature_store (utils/feature_store.py)."""

    def __init__(self, cfg, split, ids, origin=None):
        path = cfg.data.feature_store
        try:
            self.store = FeatureStore(path)
        except StoreError as err:
            raise DataError(f"data.feature_store: {err}; pack it with: {_pack_cmd(cfg, origin)} (or --from_folders DIR, "
                            f"--from_images DIR), or set data.feature_store \"\" to read the feature folders") from None
        missing = [i for i in ids if i not in self.store.row_of]
        if missing:
            raise DataError(f"{len(missing):,} of the {len(ids):,} scene ids of split '{split}' that this config "
                            f"uses are not in the feature store {path} (it holds {len(self.store.ids):,}; e.g. "
                            f"{missing[:5]}); add them with the command that packed it, given this run's --cfg "
                            f"and KEY VALUE overrides: {self.store.command}")
        _check_settings(self.store.settings, cfg, f"the feature store data.feature_store = {path}",
                        "pack a store for this config (scripts/pack_features.py --cfg ...), or set data.extraction "
                        "to its settings")
        self.ids = ids
        self.image_files = [[os.path.join(get_key(cfg, s.image_key), self.store.names[s.name][self.store.row_of[i]])
                             for i in ids] for s in LOADER_SETS]
        self.shape, self.dtype = self.store.shape, self.store.dtype

    def read(self, k, i):
        try:
            return self.store.read(LOADER_SETS[k].name, self.ids[i])
        except StoreError as err:
            raise DataError(str(err)) from None


class RCCDataset(Dataset):
    """Scene ids of one split, with features and encoded captions (see the module doc)."""

    def __init__(self, cfg, split, verbose=True, origin=None):
        """origin: (config file, KEY VALUE overrides) cfg was loaded from, when known: the commands that errors
        print then use them."""
        self.cfg = cfg
        self.split = split
        self.epoch = 0
        data = cfg.data
        self.seq_length = cfg.model.speaker.seq_length
        self.seq_per_img = data.train.seq_per_img if split == "train" else 1
        self.swap_prob = data.swap_prob if split == "train" else 0.0

        self.vocab = _load_json(data.vocab_json, "data.vocab_json", f"make it with: {_preprocess_cmd(cfg)}")
        check_vocab(self.vocab, data.vocab_json)
        self.idx_to_word = {int(i): w for w, i in self.vocab.items()}
        ids, self.change_types, in_split = select_ids(cfg, split)
        if verbose:
            counts = ", ".join(f"{t} {self.change_types.count(k):,}" for k, t in enumerate(CHANGE_TYPES))
            subset = f"{len(ids):,} of {in_split:,}" if len(ids) < in_split else f"all {len(ids):,}"
            print(f"data: {split} split, {subset} scene ids ({counts})")
        self.ids = ids
        self.features = (StoreFeatures if data.feature_store else FolderFeatures)(cfg, split, ids, origin)
        self.image_files = self.features.image_files
        self.feature_shape = self.features.shape

        self._load_labels()
        self._cache = None
        if data.in_memory:
            self._cache = [np.stack([self.features.read(k, i) for i in range(len(ids))]) for k in range(3)]

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
            labels = h5[prefix + "labels"]
            width = labels.shape[1]
            if width > self.seq_length:
                raise DataError(f"{path}: {prefix}labels hold captions of {width} tokens, longer "
                                f"than model.speaker.seq_length = {self.seq_length}; raise "
                                f"model.speaker.seq_length to at least {width}")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.vocab)):
                bad = labels.max() if labels.max() >= len(self.vocab) else labels.min()
                raise DataError(f"{path}: {prefix}labels hold word id {bad}, outside the {len(self.vocab)} "
                                f"words of data.vocab_json = {self.cfg.data.vocab_json}; the two files come "
                                f"from different runs: rebuild both with: {_preprocess_cmd(self.cfg)}")
            starts = h5[prefix + "label_start_idx"]
            without = [i for i in self.ids if i >= len(starts) or starts[i] < 0]
            if without:
                raise DataError(f"{path}: {len(without)} ids of split '{self.split}' have no "
                                f"{'no-change' if prefix else 'change'} captions (e.g. "
                                f"{without[:5]}); rebuild it with: {_preprocess_cmd(self.cfg)}")
        self.labels = h5

    def set_epoch(self, epoch):
        """Items drawn after this call depend on (cfg.seed, epoch, index) only."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.ids)

    def _features(self, k, i):
        return torch.from_numpy(self._cache[k][i] if self._cache is not None else self.features.read(k, i))

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


def worker_count(cfg):
    """data.num_workers, with -1 meaning min(4, the CPU cores this process may use)."""
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


def _loader(dataset, cfg, device, **batching):
    # A private generator keeps the loader from drawing on the global RNG (exact resume).
    return DataLoader(dataset, **batching, num_workers=worker_count(cfg), pin_memory=device.type == "cuda",
                      generator=torch.Generator())


def eval_loader(dataset, cfg, device):
    """The split in order, data.<split>.batch_size scenes at a time (validation, test)."""
    return _loader(dataset, cfg, device, batch_size=getattr(cfg.data, dataset.split).batch_size)


def epoch_batches(num_items, batch_size, seed, epoch):
    """The shuffled batches of one epoch, a function of (seed, epoch) alone; the last partial batch is dropped."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, num_items - batch_size + 1, batch_size)]


def batches_per_epoch(dataset, cfg):
    return len(dataset) // cfg.data.train.batch_size


def train_batches(dataset, cfg, device, position=0):
    """Endless stream of training batches, starting after the first ``position`` batches (exact resume).

    With several processes each rank loads its slice of the same global batches.
    """
    epoch, offset = divmod(position, batches_per_epoch(dataset, cfg))
    while True:
        dataset.set_epoch(epoch)
        batches = [distributed.local_slice(batch) for batch in
                   epoch_batches(len(dataset), cfg.data.train.batch_size, cfg.seed, epoch)[offset:]]
        yield from _loader(dataset, cfg, device, batch_sampler=batches)
        epoch, offset = epoch + 1, 0


# The reference trains 10,000 steps of 128 scenes in about two hours on one RTX 4090: the loader must deliver this.
REFERENCE_SCENES_PER_S = 10000 * 128 / (2 * 3600)


class _SceneFeatures(Dataset):
    """The three feature maps of each scene, read as RCCDataset reads them (the captions, which cost nothing
    next to them, left out): what the loader benchmark times."""

    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features.image_files[0])

    def __getitem__(self, i):
        return [torch.from_numpy(self.features.read(k, i)) for k in range(3)]


def evict_from_page_cache(paths):
    """Drops the files' pages from the OS page cache (posix_fadvise), so the next read comes from the disk;
    False where the OS cannot (then a "cold" read may be served from memory)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def benchmark_loader(features, files, num_scenes, batch_size, seed, workers=(0, 2, 4)):
    """[(workers, "cold" or "warm", scenes/s, MB/s)] reading ``num_scenes`` scenes of ``features`` (a
    FolderFeatures or StoreFeatures) in the order of the first training epoch, with each count of worker
    processes: cold after evicting ``files`` from the page cache, warm right after."""
    batch_size = min(batch_size, num_scenes)
    batches = epoch_batches(len(_SceneFeatures(features)), batch_size, seed, 0)[:num_scenes // batch_size]
    bytes_per_scene = 3 * int(np.prod(features.shape)) * features.dtype.itemsize
    rows = []
    for count in workers:
        for cache in ("cold", "warm"):
            if cache == "cold" and not evict_from_page_cache(files):
                cache = "cold (not evicted: no posix_fadvise here)"
            loader = DataLoader(_SceneFeatures(features), batch_sampler=batches, num_workers=count)
            start = time.perf_counter()
            with warnings.catch_warnings():  # more workers than cores is what is being measured
                warnings.filterwarnings("ignore", message="This DataLoader will create")
                scenes = sum(len(batch[0]) for batch in loader)
            seconds = time.perf_counter() - start
            rows.append((count, cache, scenes / seconds, scenes * bytes_per_scene / seconds / 1e6))
    return rows


def print_benchmark(rows, title):
    print(title)
    print(f"{'workers':>8}  {'page cache':<11} {'scenes/s':>9} {'MB/s':>8}")
    for count, cache, per_s, mb_per_s in rows:
        print(f"{count:>8}  {cache:<11} {per_s:>9.0f} {mb_per_s:>8.0f}")
    print(f"A training step at the reference's speed (10,000 steps of batch 128 in about 2 hours on an RTX 4090) "
          f"consumes about {REFERENCE_SCENES_PER_S:.0f} scenes/s.")


def main(argv=None):
    """`python -m utils.dataset --cfg FILE [--split S] [--benchmark] [KEY VALUE ...]`: iterate a split's loader
    once and report; or, with --benchmark, time how fast its features load (scenes/s and MB/s, page cache cold
    and warm, 0, 2 and 4 worker processes)."""
    import argparse

    from configs.defaults import load_config
    from utils.cli import int_at_least, parse_with_overrides, report_errors

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--benchmark", action="store_true", help="time the loading of the split's features")
    parser.add_argument("--scenes", type=int_at_least(1), default=1024,
                        help="--benchmark: scenes read per measurement (default 1024)")
    parser.add_argument("--workers", type=int_at_least(0), nargs="+", default=[0, 2, 4],
                        help="--benchmark: worker process counts to time (default 0 2 4)")
    args = parse_with_overrides(parser, argv)

    def run():
        cfg = load_config(args.cfg, args.opts)
        start = time.time()
        dataset = RCCDataset(cfg, args.split, origin=(args.cfg, args.opts))
        print(f"{args.split}: {len(dataset)} scene ids, features {dataset.feature_shape}, "
              f"vocabulary {len(dataset.vocab)}; indexed in {time.time() - start:.2f} s")
        device = torch.device("cpu")
        if args.benchmark:
            features = dataset.features
            files = [cfg.data.feature_store] if cfg.data.feature_store else [f for fs in features.files for f in fs]
            layout = f"the feature store {cfg.data.feature_store}" if cfg.data.feature_store else "the feature folders"
            scenes = min(args.scenes, len(dataset))
            print_benchmark(benchmark_loader(features, files, scenes, cfg.data.train.batch_size, cfg.seed,
                                             args.workers),
                            f"loading {scenes:,} scenes of the {args.split} split from {layout}, batches of "
                            f"{cfg.data.train.batch_size} in training order:")
            return
        if args.split == "train":
            per_epoch = batches_per_epoch(dataset, cfg)
            if per_epoch == 0:
                raise DataError(f"data.train.batch_size ({cfg.data.train.batch_size}) is larger than the "
                                f"{len(dataset)} ids of the train split; lower it")
            stream = train_batches(dataset, cfg, device)
            loader = (next(stream) for _ in range(per_epoch))  # one epoch, as training sees it
        else:
            loader = eval_loader(dataset, cfg, device)
        start, count = time.time(), 0
        for batch in loader:
            if count == 0:
                print("first batch: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items()
                                                  if torch.is_tensor(v)))
            count += len(batch["image_id"])
        print(f"iterated {count} scene ids in {time.time() - start:.1f} s")

    report_errors(run)


if __name__ == "__main__":
    main()
