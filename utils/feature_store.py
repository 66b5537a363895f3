"""The feature store: the three feature sets of the scene ids a run needs, in one HDF5 file.

scripts/pack_features.py writes it; the loader (utils/dataset.py) reads it when ``data.feature_store``
names it. Layout (format version 1):

    /ids                                  (N,) int64, the scene id of each row
    /features  /sc_features  /nsc_features (N, C, H, W) float16 or float32, one chunk per image
    /names/<set>                          (N,) the image file name of each row ("" until written)
    /written                              (3, N) bool, the rows that hold their image, per set
    attributes: format, version, extraction (the settings, JSON), source, command

Every chunk is allocated when the datasets are made, so writing an image changes no HDF5 metadata:
a pack that is killed leaves a readable file, and the ``written`` flags (set only after the rows
they cover were flushed) tell the next pack where to go on. A pack works on ``<store>.partial`` and
renames it to the store's name once verified, so a file under that name is always complete.
"""
import errno
import json
import os
import shutil
import time
from collections import namedtuple

import h5py
import numpy as np
import torch
from tqdm import tqdm

from utils.errors import UserError
from utils.extraction import settings_differences
from utils.fileio import FileLock

FORMAT = "clevr-change-feature-store"
VERSION = 1
PARTIAL = ".partial"

FeatureSet = namedtuple("FeatureSet", "name image_folder image_name feature_key image_key")
# The three images of a scene id: the folder (and dataset) names of the real layout, its image file
# names, and the config keys of the folders.
FEATURE_SETS = (
    FeatureSet("features", "images", "CLEVR_default_%06d.png", "data.default_feature_dir", "data.default_img_dir"),
    FeatureSet("sc_features", "sc_images", "CLEVR_semantic_%06d.png", "data.semantic_feature_dir",
               "data.semantic_img_dir"),
    FeatureSet("nsc_features", "nsc_images", "CLEVR_nonsemantic_%06d.png", "data.nonsemantic_feature_dir",
               "data.nonsemantic_img_dir"),
)
SET_NAMES = tuple(s.name for s in FEATURE_SETS)
DTYPES = {"float16": np.float16, "float32": np.float32}
_FLUSH_SECONDS = 5.0


class StoreError(UserError):
    """A feature store that cannot be read or written as asked; the message says what to do."""


def _disk_full(err):
    text = str(err)
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text \
        or "errno = 28" in text or "Disk quota exceeded" in text


def to_dtype(array, dtype):
    """``array`` converted to float16 or float32, rounding to nearest; torch converts float16 about 40 times
    faster than numpy (vectorised), and a value beyond float16's range becomes Inf in both."""
    if array.dtype == dtype:
        return array
    return torch.from_numpy(array).to(torch.float16 if dtype == np.float16 else torch.float32).numpy()


def load_feature(source, origin, fix, shape=None, error=StoreError):
    """The float32 (C, H, W) array of a .npy file (a path or a file object). ``error`` names ``origin`` and
    says ``fix`` when it cannot be read, is of another dtype or shape, or holds NaN or Inf values."""
    try:
        array = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise error(f"{origin} cannot be read ({err}); {fix}") from None
    return check_feature(array, origin, fix, error, shape)


def check_feature(array, origin, fix, error=StoreError, shape=None):
    """``array`` when it is float32 (C, H, W) (of ``shape`` when given) and finite; else ``error`` naming origin."""
    if array.dtype != np.float32 or array.ndim != 3 or (shape is not None and array.shape != tuple(shape)):
        want = f"float32 {tuple(shape)}" if shape is not None else "float32 (C, H, W)"
        raise error(f"{origin} is {array.dtype} {array.shape}, expected {want}; {fix}")
    if not np.isfinite(array).all():
        raise error(f"{origin} holds NaN or Inf values; {fix}")
    return array


def size_text(n_bytes):
    """'17.4 GB', '212 MB': sizes in the decimal units disks are sold in."""
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


class FeatureStore:
    """A finished store, for reading. Picklable; each process opens its own HDF5 handle on first read
    (DataLoader workers open theirs after the fork)."""

    def __init__(self, path):
        self.path = path
        if not os.path.isfile(path):
            partial = path + PARTIAL
            hint = (f"; {partial} is a pack that has not finished: run its pack command again to complete it"
                    if os.path.exists(partial) else "")
            raise StoreError(f"feature store {path} does not exist{hint}")
        try:
            with h5py.File(path, "r", locking=False) as f:
                if f.attrs.get("format") != FORMAT:
                    raise StoreError(f"{path} is not a feature store of this project (pack one with "
                                     f"scripts/pack_features.py)")
                if int(f.attrs["version"]) != VERSION:
                    raise StoreError(f"{path} is a feature store of format version {f.attrs['version']}; this "
                                     f"project reads version {VERSION}: pack it again")
                self.ids = [int(i) for i in f["ids"][()]]
                dataset = f[SET_NAMES[0]]
                self.shape, self.dtype = tuple(dataset.shape[1:]), dataset.dtype
                self.names = {name: [n.decode() for n in f["names"][name][()]] for name in SET_NAMES}
                self.settings = json.loads(f.attrs["extraction"])
                self.source, self.command = str(f.attrs["source"]), str(f.attrs["command"])
        except (OSError, KeyError) as err:
            raise StoreError(f"feature store {path} cannot be read ({err}); pack it again with "
                             f"scripts/pack_features.py") from None
        self.row_of = {scene_id: row for row, scene_id in enumerate(self.ids)}
        self._file, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def _datasets(self):
        if self._file is None or self._pid != os.getpid():
            # No chunk cache: each image is read once, straight into the caller's array.
            self._file = h5py.File(self.path, "r", locking=False, rdcc_nbytes=0)
            self._pid = os.getpid()
        return self._file

    def read(self, set_name, scene_id):
        """The float32 (C, H, W) features of one image; StoreError when they are not finite."""
        row = self.row_of[scene_id]
        array = np.empty(self.shape, dtype=self.dtype)
        self._datasets()[set_name].read_direct(array, np.s_[row])
        array = to_dtype(array, np.float32)
        if not np.isfinite(array).all():
            raise StoreError(f"feature store {self.path}: {set_name} of scene {scene_id} holds NaN or Inf values; "
                             f"pack the store again")
        return array


class StoreWriter:
    """Packs rows into ``<path>.partial`` (resuming one that is there, or adding ids to a finished store),
    then verifies it and renames it to ``path``. Use it as a context manager: it holds the store's lock."""

    def __init__(self, path, ids, settings, dtype, source, command):
        self.path, self.partial = path, path + PARTIAL
        self.wanted = sorted(set(ids))
        self.settings, self.dtype, self.source, self.command = settings, np.dtype(DTYPES[dtype]), source, command
        self._lock = FileLock(path + ".lock", f"the feature store {path}", "another packer",
                              "wait for it to finish: two packers cannot write one store", StoreError)
        self._file = None
        self._pending = []
        self._last_flush = time.time()

    # -------------------------------------------------------------- opening
    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the folder of the store {self.path} ({err.strerror})") from None
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            try:
                self._flush()
            finally:
                self._file.close()
                self._file = None
        self._lock.release()

    def _open(self):
        if not os.path.exists(self.partial) and os.path.exists(self.path):
            finished = FeatureStore(self.path)
            self._check_compatible(finished.settings, finished.dtype, self.path)
            if set(self.wanted) <= set(finished.ids):
                self.complete = finished
                return
            os.replace(self.path, self.partial)  # adding ids: the store is incomplete until verified
            print(f"adding {len(set(self.wanted) - set(finished.ids)):,} scene ids to {self.path} "
                  f"(it holds {len(finished.ids):,})")
        self.complete = None
        if os.path.exists(self.partial):
            try:
                self._file = h5py.File(self.partial, "r+", locking=False)
                self._check_compatible(json.loads(self._file.attrs["extraction"]), self._file[SET_NAMES[0]].dtype
                                       if SET_NAMES[0] in self._file else self.dtype, self.partial)
                self._rows_from_file()
            except (OSError, KeyError, ValueError) as err:
                if self._file is not None:
                    self._file.close()
                raise StoreError(f"{self.partial}, the unfinished pack of {self.path}, cannot be read ({err}); "
                                 f"delete it and pack again") from None
            self._file.attrs.update({"source": self.source, "command": self.command})  # the latest pack's
            done = int(self._file["written"][()].sum()) if "written" in self._file else 0
            print(f"resuming {self.partial}: {done:,} images already packed")
            self._add_rows([i for i in self.wanted if i not in self.row_of])
            self.wanted = sorted(self.ids)  # every row of the file gets its images, also those of an earlier config
        else:
            self._file = h5py.File(self.partial, "w", locking=False)
            self._file.attrs.update({"format": FORMAT, "version": VERSION, "extraction": json.dumps(self.settings),
                                     "source": self.source, "command": self.command})
            self.ids, self.row_of = [], {}
            self._add_rows(self.wanted)

    def _check_compatible(self, settings, dtype, path):
        if settings != self.settings:
            raise StoreError(f"{path} holds features of other extraction settings ("
                             f"{settings_differences(settings, self.settings)}); pack into another file "
                             f"(--output), or delete {path}")
        if np.dtype(dtype) != self.dtype:
            raise StoreError(f"{path} holds {np.dtype(dtype).name} features, and --dtype {self.dtype.name} was "
                             f"asked for; pack with --dtype {np.dtype(dtype).name}, or into another file (--output)")

    def _rows_from_file(self):
        self.ids = [int(i) for i in self._file["ids"][()]]
        self.row_of = {scene_id: row for row, scene_id in enumerate(self.ids)}

    @property
    def shape(self):
        return tuple(self._file[SET_NAMES[0]].shape[1:]) if SET_NAMES[0] in self._file else None

    def _add_rows(self, new_ids):
        """Appends rows for new_ids (and allocates them when the image shape is known)."""
        f = self._file
        if "ids" not in f:
            f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
            f.create_dataset("written", shape=(len(SET_NAMES), 0), maxshape=(len(SET_NAMES), None),
                             dtype=bool, chunks=(len(SET_NAMES), 4096))
            for name in SET_NAMES:
                f.create_dataset(f"names/{name}", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
                                 chunks=(4096,))
        if new_ids:
            total = len(self.ids) + len(new_ids)
            f["ids"].resize((total,))
            f["ids"][len(self.ids):] = new_ids
            f["written"].resize((len(SET_NAMES), total))
            f["written"][:, len(self.ids):] = False
            for name in SET_NAMES:
                f[f"names/{name}"].resize((total,))
                if name in f:
                    f[name].resize((total, *f[name].shape[1:]))
            f.flush()
            self._rows_from_file()

    def _create_feature_datasets(self, shape):
        """The three (N, C, H, W) datasets, every chunk allocated now and never filled (a sparse file)."""
        for name in SET_NAMES:
            plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            plist.set_chunk((1, *shape))
            plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            space = h5py.h5s.create_simple((len(self.ids), *shape), (h5py.h5s.UNLIMITED, *shape))
            h5py.h5d.create(self._file.id, name.encode(), h5py.h5t.py_create(self.dtype), space, dcpl=plist)
        self._file.flush()

    # -------------------------------------------------------------- writing
    def missing(self, set_name):
        """The wanted ids whose image of set_name is not packed yet."""
        if self.complete is not None:
            return set()
        written = self._file["written"][SET_NAMES.index(set_name)]
        return {scene_id for scene_id in self.wanted if not written[self.row_of[scene_id]]}

    def missing_count(self):
        return sum(len(self.missing(name)) for name in SET_NAMES)

    def image_bytes(self, shape):
        return int(np.prod(shape)) * self.dtype.itemsize

    def check_space(self, shape):
        """Prints the space the images still to pack need; StoreError when the disk has less."""
        needed = self.missing_count() * self.image_bytes(shape)
        folder = os.path.dirname(os.path.abspath(self.path))
        free = shutil.disk_usage(folder).free
        tqdm.write(f"{self.missing_count():,} images of {self.dtype.name} {shape} to pack: {size_text(needed)} "
              f"({size_text(free)} free in {folder})")
        if free < needed * 1.02 + 2**27:
            raise StoreError(f"the store {self.path} needs {size_text(needed)} more and {folder} has "
                             f"{size_text(free)} free; free some space or pack to another disk (--output)")

    def write(self, set_name, scene_id, image_name, array, origin):
        """Stores the float32 (C, H, W) features of one image; ``origin`` names their file for errors."""
        if self.shape is None:
            self.check_space(array.shape)
            self._create_feature_datasets(array.shape)
        if array.shape != self.shape:
            raise StoreError(f"{origin} has features of shape {array.shape}, and the store holds {self.shape}; "
                             f"every image must come from the same extraction")
        converted = to_dtype(array, self.dtype)
        if not np.isfinite(converted).all():
            beyond = np.isfinite(array).all()
            raise StoreError(f"{origin} " + (f"holds values up to {np.abs(array).max():.3g}, beyond float16's "
                                             f"range (65,504): pack with --dtype float32" if beyond else
                                             "holds NaN or Inf values: re-extract it"))
        row = self.row_of[scene_id]
        try:
            self._file[set_name][row] = converted
            self._file[f"names/{set_name}"][row] = image_name
            self._pending.append((SET_NAMES.index(set_name), row))
            if time.time() - self._last_flush > _FLUSH_SECONDS:
                self._flush()
        except OSError as err:
            self._raise_write_error(err)

    def unmark(self, images):
        """Marks (set name, scene id) images as not packed: the next pack writes them again."""
        self._flush()
        written = self._file["written"][()]
        for set_name, scene_id in images:
            written[SET_NAMES.index(set_name), self.row_of[scene_id]] = False
        self._file["written"][...] = written
        self._file.flush()

    def _flush(self):
        """Flushes the rows written so far, then marks them written (the flags never run ahead of the data)."""
        try:
            self._file.flush()
            if self._pending:
                written = self._file["written"][()]
                for set_index, row in self._pending:
                    written[set_index, row] = True
                self._file["written"][...] = written
                self._file.flush()
        except OSError as err:
            self._pending = []
            self._raise_write_error(err)
        self._pending = []
        self._last_flush = time.time()

    def _raise_write_error(self, err):
        folder = os.path.dirname(os.path.abspath(self.path))
        if _disk_full(err):
            raise StoreError(f"no space left in {folder} while packing {self.path} ({size_text(shutil.disk_usage(folder).free)} "
                             f"free); what was packed is kept in {self.partial}: free some space and run the same "
                             f"command again, it resumes") from None
        raise StoreError(f"cannot write {self.partial} ({err}); check the disk, then run the same command again, "
                         f"it resumes") from None

    # -------------------------------------------------------------- finishing
    def finish(self, progress=None):
        """Checks every image (count, shape, finite values), then renames the store to its final name.
        Returns the summary line."""
        if self.complete is not None:
            store = self.complete
            return (f"{self.path} already holds all {len(self.wanted):,} scene ids "
                    f"({len(store.ids):,} in all, {store.dtype.name} {store.shape})")
        self._flush()
        missing = {name: len(self.missing(name)) for name in SET_NAMES}
        if any(missing.values()):
            raise StoreError(f"the source lacks images of {sum(missing.values()):,} wanted scene ids ("
                             + ", ".join(f"{name} {n:,}" for name, n in missing.items() if n)
                             + f"); what was packed is kept in {self.partial}. Use a source that holds every id "
                               f"the config needs")
        written = self._file["written"][()]
        if not written.all():
            raise StoreError(f"{self.partial}: {int((~written).sum()):,} rows of ids not wanted here are unwritten; "
                             f"delete it and pack again")
        for name in SET_NAMES:
            dataset = self._file[name]
            for start in range(0, len(self.ids), 64):
                block = dataset[start:start + 64]
                if not np.isfinite(block).all():
                    row = start + int(np.argwhere(~np.isfinite(block))[0][0])
                    raise StoreError(f"{self.partial}: {name} of scene {self.ids[row]} reads back with NaN or Inf "
                                     f"values (a disk error?); delete {self.partial} and pack again")
                if progress is not None:
                    progress(len(block))
        shape, count = self.shape, len(self.ids)
        self._file.close()
        self._file = None
        os.replace(self.partial, self.path)
        size = os.path.getsize(self.path)
        return (f"wrote {self.path}: {count:,} scene ids x {len(SET_NAMES)} images, {self.dtype.name} {shape}, "
                f"{size_text(size)} (verified: every image present, of that shape, finite)")
