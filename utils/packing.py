"""Packing a feature store (utils/feature_store.py) from one of three sources: the features archive read as
a stream, the three feature folders, or the images (extracted on the way). scripts/pack_features.py is its
command line; the loader benchmark (research/benchmark_loader.py) packs with it too.
"""
import gzip
import io
import json
import os
import re
import sys
import tarfile
import time
import zlib

import numpy as np
from tqdm import tqdm

from utils.dataset import SPLITS, check_feature_shape, select_ids
from utils.extraction import Extractor, default_device, describe_settings, read_stamp, settings_from_config
from utils.feature_store import (FEATURE_SETS, SET_NAMES, StoreError, StoreWriter, check_feature, load_feature,
                                 size_text)
from utils.fileio import files_by_id

# An archive member of a feature: <set>/<image name>.npy, the image name ending in the scene id.
_MEMBER = re.compile(r"(?:^|/)(" + "|".join(SET_NAMES) + r")/([^/]*?(\d+)\.[A-Za-z]+)\.npy$")
_IMAGE_ID = re.compile(r"(\d+)\.[A-Za-z]+$")


class PackError(StoreError):
    """The source cannot be packed as asked; the message names the file and what to do."""


def wanted_ids(cfg, splits=SPLITS):
    """The scene ids the config uses in ``splits``."""
    ids = set()
    for split in splits:
        ids.update(select_ids(cfg, split)[0])
    return sorted(ids)


class Packing:
    """The images still to pack, a progress bar, and the checks every feature passes on its way in."""

    def __init__(self, cfg, writer):
        self.cfg, self.writer = cfg, writer
        self.missing = {name: writer.missing(name) for name in SET_NAMES}
        self.total = sum(len(m) for m in self.missing.values())
        self.packed, self.bytes_in, self.start = 0, 0, time.time()
        self.bar = None
        self.at = None  # the member or file being read, for messages
        self.this_run = []  # (set name, scene id) packed by this run

    def remaining(self):
        return self.total - self.packed

    def put(self, set_name, scene_id, image_name, array, origin):
        if self.writer.shape is None:
            check_feature_shape(self.cfg, array.shape, origin)
        self.writer.write(set_name, scene_id, image_name, array, origin)
        self.this_run.append((set_name, scene_id))
        self.missing[set_name].discard(scene_id)
        self.packed += 1
        self.bytes_in += array.nbytes
        if self.bar is not None:
            elapsed = max(time.time() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.packed:,}/{self.total:,} images, {self.packed / elapsed:.0f} img/s, "
                                     f"{self.bytes_in / elapsed / 1e6:.0f} MB/s of features", refresh=False)


    def unmark_this_run(self):
        """The images of this run are packed again by the next one (their source turned out damaged)."""
        self.writer.unmark(self.this_run)
        self.packed, self.this_run = 0, []


class _CountingReader(io.RawIOBase):
    """A file read front to back that counts its bytes (the progress of a stream)."""

    def __init__(self, handle, on_read):
        self.handle, self.on_read = handle, on_read

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.handle.readinto(buffer)
        self.on_read(n or 0)
        return n


class _Damaged(Exception):
    """The archive's content is wrong (not merely cut short); the message says where."""


def _drain(stream):
    """Reads the stream to its end, after the tar's end-of-archive blocks: gzip then checks its CRC and length,
    and anything but zero padding means tarfile stopped at a damaged header and took it for the end."""
    while True:
        block = stream.read(1 << 20)
        if not block:
            return
        if block.strip(b"\0"):
            raise _Damaged("data after what reads as the end of the archive (a damaged member header)")


def _read_members(tar, path, packing):
    expected = packing.cfg.data.extraction
    for member in tar:
        packing.at = member.name
        origin = f"{path}: member {member.name}"
        if os.path.basename(member.name) == "extraction.json" and member.isfile():
            _check_stamp(_json(tar.extractfile(member).read(), origin), expected, origin)
            continue
        found = _MEMBER.search(member.name)
        if not found or not member.isfile():
            continue
        set_name, image_name, scene_id = found.group(1), found.group(2), int(found.group(3))
        if scene_id not in packing.missing[set_name]:
            continue
        data = tar.extractfile(member).read()
        if len(data) != member.size:
            raise EOFError(f"{len(data)} of the member's {member.size} bytes")
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise _Damaged(f"the member is not a .npy file: {err}") from None
        packing.put(set_name, scene_id, image_name, check_feature(array, origin, "this archive does not hold the features expected here", PackError), origin)


def pack_archive(path, packing):
    """Packs the wanted images of a .tar.gz (or .tar) read front to back once, as a stream: nothing is unpacked.

    The whole archive is read, so that gzip can check its CRC: a damaged archive may decompress into wrong
    bytes without an error until then, so the images of this run are unmarked (packed again next time). An
    archive cut short keeps them: what came before the cut was read correctly.
    """
    if not os.path.isfile(path):
        raise PackError(f"--from_archive {path} does not exist; give the path of clevr_change_features.tar.gz")
    packing.at = "its start"
    with open(path, "rb") as raw, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                       desc=f"reading {os.path.basename(path)}") as bar:
        packing.bar = bar
        stream = io.BufferedReader(_CountingReader(raw, bar.update), 1 << 20)
        if not path.endswith(".tar"):
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        where = lambda: f"near {packing.at}, after {size_text(bar.n)} of {size_text(bar.total)}"  # noqa: E731
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                _read_members(tar, path, packing)
            _drain(stream)
        except (EOFError, tarfile.ReadError) as err:
            if isinstance(err, tarfile.ReadError) and "unexpected end of data" not in str(err):
                packing.unmark_this_run()
                raise PackError(f"{path} is not a readable tar archive ({where()}: {err}); download it again")
            raise PackError(f"{path} ends early ({where()}: {err}): the download is incomplete. Download it "
                            f"again, then run this command again: it keeps the {packing.packed:,} images packed "
                            f"so far") from None
        except (_Damaged, tarfile.TarError, zlib.error, gzip.BadGzipFile) as err:
            packing.unmark_this_run()
            raise PackError(f"{path} is damaged ({where()}: {err}); download it again. The images read from it in "
                            f"this run were not kept") from None


def _json(data, origin):
    try:
        return json.loads(data)
    except ValueError as err:
        raise PackError(f"{origin} is not valid JSON ({err})") from None


def _check_stamp(found, expected_node, where):
    expected = settings_from_config(expected_node)
    if found is not None and found != expected:
        raise PackError(f"{where} holds features of {describe_settings(found)}, but the config expects "
                        f"{describe_settings(expected)} (data.extraction); pack with a config of those settings")


def _set_folders(root, kind):
    """{set name: folder} of the three feature (kind 'feature') or image folders under root."""
    return {s.name: os.path.join(root, s.name if kind == "feature" else s.image_folder) for s in FEATURE_SETS}


def _by_id(folder, pattern, what):
    if not os.path.isdir(folder):
        raise PackError(f"{what} folder {folder} does not exist; give the folder that holds "
                        f"{', '.join(SET_NAMES)} (or images, sc_images, nsc_images)")
    return files_by_id(folder, pattern)


def _require(index, ids, folder, what):
    absent = sorted(i for i in ids if i not in index)
    if absent:
        raise PackError(f"{len(absent):,} scene ids that the config uses have no {what} in {folder} (e.g. "
                        f"{absent[:5]}); use the complete folder")


def pack_folders(root, packing):
    folders = _set_folders(root, "feature")
    with tqdm(total=packing.total, unit="img", desc="packing feature folders") as bar:
        packing.bar = bar
        for set_name, folder in folders.items():
            _check_stamp(read_stamp(folder) if os.path.isdir(folder) else None, packing.cfg.data.extraction, folder)
            index = _by_id(folder, re.compile(r"(\d+)\.[A-Za-z]+\.npy$"), "feature")
            todo = sorted(packing.missing[set_name])
            _require(index, todo, folder, "feature file")
            for scene_id in todo:
                path = os.path.join(folder, index[scene_id])
                array = load_feature(path, f"feature file {path}", "re-extract it (scripts/extract_features.py)",
                                     error=PackError)
                packing.put(set_name, scene_id, index[scene_id][:-len(".npy")], array, f"feature file {path}")
                bar.update()


def pack_images(root, packing, batch_size, device):
    folders = _set_folders(root, "image")
    settings = settings_from_config(packing.cfg.data.extraction)
    extractor = None
    with tqdm(total=packing.total, unit="img", desc=f"extracting ({describe_settings(settings)})") as bar:
        packing.bar = bar
        for set_name, folder in folders.items():
            index = _by_id(folder, _IMAGE_ID, "image")
            todo = sorted(packing.missing[set_name])
            _require(index, todo, folder, "image")
            if not todo:
                continue
            if extractor is None:
                extractor = Extractor(settings, device or default_device())
            extractor.calibrate(folder, batch_size)
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                feats = extractor([os.path.join(folder, index[i]) for i in chunk]).numpy()
                for scene_id, feat in zip(chunk, feats):
                    packing.put(set_name, scene_id, index[scene_id], feat, os.path.join(folder, index[scene_id]))
                bar.update(len(chunk))


def pack_store(cfg, path, source, dtype="float16", command="", batch_size=128, device=None, splits=SPLITS):
    """Packs the scene ids cfg uses in ``splits`` into the store ``path``; returns its summary line.

    source: ("archive", FILE), ("folders", DIR) or ("images", DIR): DIR holds the three folders.
    """
    kind, where = source
    ids = wanted_ids(cfg, splits)
    settings = settings_from_config(cfg.data.extraction)
    described = {"archive": f"archive {where}", "folders": f"feature folders in {where}",
                 "images": f"images in {where} ({describe_settings(settings)})"}[kind]
    print(f"packing {len(ids):,} scene ids from the {described} into {path}, {dtype}")
    with StoreWriter(path, ids, settings, dtype, described, command) as writer:
        packing = Packing(cfg, writer)
        if packing.total:
            if writer.shape is not None:
                writer.check_space(writer.shape)
            try:
                if kind == "archive":
                    pack_archive(where, packing)
                elif kind == "folders":
                    pack_folders(where, packing)
                else:
                    pack_images(where, packing, batch_size, device)
            except KeyboardInterrupt:  # leaving the with block flushes what was packed
                print(f"Ctrl-C: stopped after {packing.packed:,} images; they are kept in {writer.partial}: run the "
                      f"same command again to go on")
                sys.exit(130)
        rows = len(writer.ids) if writer.complete is None else 0
        with tqdm(total=rows * len(SET_NAMES), unit="img", desc="verifying", disable=not rows) as bar:
            return writer.finish(bar.update)
