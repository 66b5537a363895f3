"""Snapshots: one self-contained dict, written atomically, loaded with weights_only=True."""
import errno
import os
import random
import re
import shutil

import numpy as np
import torch
import yaml

from configs.defaults import get_cfg_defaults
from utils.errors import UserError
from utils.layout import ExperimentLayout

SNAPSHOT_KEYS = ("change_detector_state", "speaker_state", "cbr_state", "optimizer_state",
                 "scheduler_state", "iteration", "rng_state", "config", "vocab")
INFERENCE_KEYS = ("change_detector_state", "speaker_state", "config", "vocab")  # what test.py needs


# Keys that may change between a snapshot and a resumed run without changing what is trained.
RESUME_MAY_CHANGE = ("exp_dir", "gpu_id", "logger.", "data.num_workers", "data.in_memory", "data.val.batch_size",
                     "data.test.", "train.log_interval", "train.compile")


class SnapshotError(UserError):
    """A snapshot that is missing, unreadable or does not fit the model."""


def snapshot_dir(cfg):
    return ExperimentLayout.of(cfg).snapshots


def snapshot_path(cfg, iteration):
    return ExperimentLayout.of(cfg).snapshot(iteration)


def list_snapshots(cfg):
    """Iterations of the experiment's snapshots, ascending."""
    return ExperimentLayout.of(cfg).snapshot_iterations()


def config_to_dict(cfg):
    """The config as plain nested dicts and lists, loadable with weights_only=True."""
    return yaml.safe_load(cfg.dump())


def capture_rng_state():
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _disk_full(err):
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch's zip writer reports a full disk as a RuntimeError ("... file write failed").
    return isinstance(err, RuntimeError) and "write failed" in str(err)


def save_snapshot(path, snapshot):
    """Writes to a temporary file, syncs it, then renames: a crash never leaves a half-written snapshot.

    A full disk is a SnapshotError naming the folder and the space needed; earlier snapshots stay.
    """
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as handle:
            torch.save(snapshot, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        if not _disk_full(err):
            raise
        size = os.path.getsize(tmp_path) if os.path.exists(tmp_path) else 0
        raise SnapshotError(f"no space left in {folder} while writing {os.path.basename(path)} (it needs about "
                            f"{max(size, snapshot_bytes(snapshot)) / 2**20:.0f} MiB, "
                            f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB are free); the earlier snapshots "
                            f"are intact: free some space and continue with --resume") from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def snapshot_bytes(snapshot):
    """About the size of a snapshot on disk: the bytes of its tensors."""
    total = 0
    stack = [snapshot]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def config_differences(stored, cfg, prefix="", defaults=None):
    """["key: stored -> now", ...] between a snapshot's config (plain dict) and cfg, except RESUME_MAY_CHANGE.

    A key the snapshot lacks (it is older than the key) counts as a difference only when cfg's value is
    not the default, which is what the older code did.
    """
    defaults = get_cfg_defaults() if defaults is None else defaults
    found = []
    for key, value in cfg.items():
        name = prefix + key
        if name.startswith(RESUME_MAY_CHANGE) or name in RESUME_MAY_CHANGE:
            continue
        absent = not isinstance(stored, dict) or key not in stored
        old = value if absent and value == defaults.get(key) else "<absent>" if absent else stored[key]
        if isinstance(value, dict):
            found += config_differences(old if isinstance(old, dict) else {}, value, name + ".", defaults.get(key, {}))
        elif (list(old) if isinstance(old, (list, tuple)) else old) != (list(value) if isinstance(value, (list, tuple)) else value):
            found.append(f"{name}: {old!r} -> {value!r}")
    return found


def _load_failure(err):
    """The useful line of a torch.load error. torch's full text advises weights_only=False,
    which would run whatever code the file holds, so it is not passed on."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first_sentence = re.split(r"(?<=\.)\s", lines[0], maxsplit=1)[0] if lines else "no details"
    return f"{type(err).__name__}: {first_sentence[:200]}"


def load_snapshot(path, required=INFERENCE_KEYS):
    """Loads a snapshot written by save_snapshot (no pickled code is executed) that holds the
    ``required`` keys (SNAPSHOT_KEYS to resume training)."""
    if not os.path.isfile(path):
        raise SnapshotError(f"snapshot {path} does not exist")
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated or foreign files
        raise SnapshotError(f"{path} is not a readable snapshot ({_load_failure(err)}); it may be "
                            f"truncated or not written by train.py (only tensors and plain Python "
                            f"values are loaded; a file holding other objects is refused)") from None
    if not isinstance(snapshot, dict):
        raise SnapshotError(f"{path} is not a snapshot: it holds a {type(snapshot).__name__}, not a dict")
    missing = [key for key in required if key not in snapshot]
    if missing:
        raise SnapshotError(f"{path} is not a snapshot of this project: it lacks {', '.join(missing)}")
    return snapshot


def load_weights(module, state, name, path):
    """load_state_dict(strict=True) with an error naming the mismatching keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if wrong_shape:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: snapshot {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong_shape[:5]))
        raise SnapshotError(f"{path}: {name} does not fit the model built from the config ("
                            + "; ".join(parts) + "); was it trained with another architecture?")
    module.load_state_dict(state, strict=True)
