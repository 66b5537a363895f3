"""The steps of notebooks/assignment.ipynb, the assignment in a browser (Google Colab), as small functions.

The notebook's cells call these, so every step also runs outside Colab (the tests run the notebook on the
CPU), and what only Colab has (its Drive mount, its port frames) is found at run time and replaced by a
stand-in in the tests. A problem the student can fix stops the notebook with Stop: one message that says
what to do, shown without a traceback.

The notebook imports this module before it installs the requirements on Colab, so the project's modules
(and yacs, h5py, visdom) are imported inside the functions that need them.
"""
import collections
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

DRIVE = "/content/drive"  # where Colab mounts Google Drive
RUNTIME_HINT = "Runtime > Change runtime type > T4 GPU"
PARAMETERS = "the first code cell (the parameters)"
PROGRESS_BAR = re.compile(r"\d+%\|")  # a line of tqdm's progress bar
DRIVE_DOWNLOAD = re.compile(r"^https?://(drive|docs)\.google\.com/")
# The modules the tools import that a fresh Python lacks (torch, numpy, matplotlib come with Colab).
REQUIRED = ("torch", "h5py", "yacs", "visdom", "pycocoevalcap", "spacy", "matplotlib", "tqdm")
# Drive space kept free beside the store for the experiment: the quick config's snapshots are 113 MB each
# (weights and two Adam moments of 9.4 M parameters), 6 of them (every 500 of 3,000 iterations), and logs.
EXPERIMENT_RESERVE = 10 ** 9
STORE_ITEMSIZE = 2  # bytes per value of a float16 store, the packer's default


class Stop(Exception):
    """A step cannot go on; the message says what to do. IPython shows it without a traceback."""

    def _render_traceback_(self):
        return [f"Stopped: {self}"]


# ------------------------------------------------------------------ Colab and Drive
def in_colab():
    return "google.colab" in sys.modules


def on_drive(path):
    return os.path.abspath(path).startswith(DRIVE + os.sep)


def require_drive(path):
    """Stop when ``path`` lies on Google Drive and Drive is not mounted (access declined, or the mount dropped)."""
    if on_drive(path) and not os.path.isdir(os.path.join(DRIVE, "MyDrive")):
        raise Stop(f"{path} is on Google Drive, and Drive is not mounted at {DRIVE}: run the set-up cell (1. Set-up: "
                   f"the handout) again and allow the access it asks for. Without Drive, set WORK_DIR in "
                   f"{PARAMETERS} to a folder under /content: it is lost when the runtime disconnects")


def local_dir(path):
    """The folder on the machine's own disk (LOCAL_DIR), created when absent."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise Stop(f"cannot create LOCAL_DIR {path} ({err.strerror}); outside Colab set LOCAL_DIR in {PARAMETERS} "
                   f"to a folder on your disk, e.g. data/local") from None
    return path


def size_text(n_bytes):
    from utils.feature_store import size_text as store_size_text

    return store_size_text(n_bytes)


# ------------------------------------------------------------------ commands
def shown(command):
    """The command as the README prints it: `python` for this Python."""
    words = ["python" if word == sys.executable else word for word in command]
    return " ".join(shlex.quote(word) for word in words)


def run(command):
    """Runs a command (a leading "python" is this Python), its output shown as it comes.

    Returns (exit status, its last lines). The notebook's Stop button sends the command SIGINT (the tools save
    their work and exit), waits for it, and stops the cell.
    """
    command = [sys.executable if i == 0 and word == "python" else str(word) for i, word in enumerate(command)]
    print(f"$ {shown(command)}", flush=True)
    tail = collections.deque(maxlen=200)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    interrupted = False
    while True:
        try:
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            tail.append(chunk.decode("utf-8", "replace"))
            sys.stdout.write(tail[-1])
            sys.stdout.flush()
        except KeyboardInterrupt:
            interrupted = True
            proc.send_signal(signal.SIGINT)
    proc.stdout.close()
    status = proc.wait()
    if interrupted:
        raise Stop(f"interrupted: {shown(command[:2])} stopped (exit status {status}); run this cell again, it "
                   f"goes on where it stopped")
    return status, "".join(tail)


def last_lines(text, count):
    """The last ``count`` lines of a tool's output; a progress bar's updates (carriage returns) count as lines."""
    return [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()][-count:]


def check(command, step):
    """run(); Stop naming the step and the tool's own error line when the command fails."""
    status, tail = run(command)
    if status:
        raise Stop(failure(step, status, tail))


def failure(step, status, tail):
    lines = [line for line in last_lines(tail, 200) if not PROGRESS_BAR.search(line)]
    errors = [line for line in lines if line.startswith("error:")]
    said = errors[-1] if errors else (lines[-1] if lines else "no output")
    if status == 130:
        return f"{step} was stopped ({said}); run this cell again: it goes on where it stopped"
    return f"{step} failed (exit status {status}): {said}"


# ------------------------------------------------------------------ set-up
def install():
    """On Colab: the requirements (Colab has torch) and Java. Everywhere: Stop when a module or Java is missing."""
    if in_colab():
        check(["python", "-m", "pip", "install", "--quiet", "setuptools<81", "wheel"], "pip")
        # visdom 0.2.4 builds from source with pkg_resources: hence the old setuptools and no build isolation.
        check(["python", "-m", "pip", "install", "--quiet", "--no-build-isolation", "-r", "requirements.txt"], "pip")
        if shutil.which("java") is None:  # the caption metrics run Java
            check(["apt-get", "update", "-qq"], "apt-get")
            check(["apt-get", "install", "-y", "-qq", "default-jre-headless"], "apt-get")
        importlib.invalidate_caches()
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise Stop(f"this Python ({sys.executable}) lacks {', '.join(missing)}: run `make setup` in the repository "
                   f"and start this notebook with the kernel of .venv, or run `pip install --no-build-isolation -r "
                   f"requirements.txt` for this Python")
    if shutil.which("java") is None:
        raise Stop("Java is missing, and the caption metrics need it: install it (Ubuntu: sudo apt-get install "
                   "default-jre-headless), then run this cell again")
    print(f"requirements: all there for {sys.executable}")


def pick_amp(capability):
    """fp16 on GPUs without fast bf16 (compute capability below 8: the T4 of Colab), bf16 from 8 (A100, RTX 30xx)."""
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def gpu_check(data):
    """SimpleNamespace(id, amp): the GPU the steps use and its half precision, or the CPU, with the reason.

    On Colab without a GPU the real data stops here: its training needs one.
    """
    import torch

    from utils.device import _cuda_diagnosis

    usable, reason = _cuda_diagnosis()
    if usable and torch.cuda.device_count() > 0:
        capability = torch.cuda.get_device_capability(0)
        amp = pick_amp(capability)
        memory = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        print(f"GPU 0: {torch.cuda.get_device_name(0)}, compute capability {capability[0]}.{capability[1]}, "
              f"{memory:.0f} GiB: training uses train.amp {amp}"
              + (" (half precision with loss scaling: no fast bf16 below compute capability 8)" if amp == "fp16"
                 else " (bfloat16: no loss scaling needed)"))
        return SimpleNamespace(id=0, amp=amp)
    said = f"no usable GPU: {reason or 'torch finds no CUDA device'}"
    if in_colab():
        if data == "clevr_change":
            raise Stop(f"{said}. Training on the real data needs a GPU: {RUNTIME_HINT}, then run the notebook again "
                       f"from the top (the runtime restarts; what is on Drive stays)")
        print(f"{said}. The synthetic data runs on the CPU; for a GPU: {RUNTIME_HINT}")
    else:
        print(f"{said}. The steps run on the CPU: fine for the synthetic data, far too slow for the real data")
    return SimpleNamespace(id=-1, amp="none")


def load_config(cfg_path, extra):
    from configs.defaults import ConfigError, load_config as load

    try:
        return load(cfg_path, list(extra))
    except ConfigError as err:
        raise Stop(f"{err} (CFG and EXTRA are set in {PARAMETERS})") from None


# ------------------------------------------------------------------ the course's archives
def archive(link, name, local):
    """The path of one of the course's archives: the file on Drive (or disk) it names, or its download."""
    if not link:
        raise Stop(f"{name} is empty: the course puts its link in {PARAMETERS}, in the block 'For the course to fill "
                   f"in'. Ask the course for the link of {name.lower().replace('_', ' ')}, set {name}, and run the "
                   f"notebook again from the top")
    if DRIVE_DOWNLOAD.match(link):
        raise Stop(f"{name} is a Google Drive page ({link}), not a file: open it, add it to your Drive (Organize > Add "
                   f"shortcut, into My Drive), and set {name} to its path, e.g. {DRIVE}/MyDrive/<its name>. It is then "
                   f"read from Drive: no download, and a shortcut costs no Drive space")
    if re.match(r"^https?://", link):
        return download(link, os.path.join(local, "downloads", os.path.basename(link.split("?")[0]) or name.lower()))
    require_drive(link)
    if not os.path.isfile(link):
        raise Stop(f"{name} = {link} is not a file: check the path (on Colab the Files pane on the left shows "
                   f"{DRIVE}/MyDrive) and set {name} in {PARAMETERS}")
    return link


def download(url, path, chunk=1 << 20):
    """Downloads url to path through path.partial, resuming a partial download; Stop with what to do on failure."""
    if os.path.isfile(path):
        return path
    from tqdm import tqdm

    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # the server sends the whole file: start again
                have = 0
            left = int(response.headers.get("Content-Length") or 0)
            free = shutil.disk_usage(os.path.dirname(path)).free
            if left > free:
                raise Stop(f"{url} is {size_text(have + left)}, and {os.path.dirname(path)} has {size_text(free)} "
                           f"free: free some space, or add the file to your Drive and give its path instead")
            with open(partial, "ab" if have else "wb") as out, tqdm(
                    total=have + left or None, initial=have, unit="B", unit_scale=True,
                    desc=f"downloading {os.path.basename(path)}") as bar:
                while True:
                    block = response.read(chunk)
                    if not block:
                        break
                    out.write(block)
                    bar.update(len(block))
            if left and os.path.getsize(partial) < have + left:
                raise Stop(f"the download of {url} ended early; run this cell again: it goes on where it stopped")
    except urllib.error.HTTPError as err:
        if err.code != 416 or not have:  # 416: nothing left to send, the partial file is whole
            raise Stop(f"{url} answered HTTP {err.code} ({err.reason}): check the link in {PARAMETERS}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise Stop(f"downloading {url} failed ({reason}); run this cell again: it goes on where it stopped") from None
    os.replace(partial, path)
    return path


# ------------------------------------------------------------------ images, captions, labels
def image_folders(local):
    """{config key: folder} of the three image folders of the real data, on the machine's disk."""
    from utils.feature_store import FEATURE_SETS

    return {feature_set.image_key: os.path.join(local, feature_set.image_folder) for feature_set in FEATURE_SETS}


def unpack_images(path, data_dir, local):
    """Unpacks clevr_change.tar.gz read as a stream: the image folders into ``local``, the json files (captions,
    splits, types) into ``data_dir``. Each file is written under a temporary name first; a marker written last
    says the images are complete, so an unpack that was cut off is done again."""
    from tqdm import tqdm

    from utils.feature_store import FEATURE_SETS

    folders = {s.image_folder for s in FEATURE_SETS}
    marker = os.path.join(local, ".images_unpacked")
    if os.path.exists(marker):
        os.remove(marker)
    counts = collections.Counter()
    with tarfile.open(path, "r|*") as tar, tqdm(unit=" files", desc=f"unpacking {os.path.basename(path)}") as bar:
        for member in tar:
            parts = member.name.split("/")
            folder = next((part for part in parts[:-1] if part in folders), None)
            if not member.isfile() or not (folder or parts[-1].endswith(".json")):
                continue
            target = os.path.join(local, folder, parts[-1]) if folder else os.path.join(data_dir, parts[-1])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(member) as source, open(target + ".tmp", "wb") as out:
                shutil.copyfileobj(source, out)
            os.replace(target + ".tmp", target)
            counts[folder or "json"] += 1
            bar.update()
    missing = sorted(folders - set(counts))
    if missing:
        raise Stop(f"{path} holds no {', '.join(missing)} folder: is it clevr_change.tar.gz? Check IMAGES_ARCHIVE in "
                   f"{PARAMETERS}")
    with open(marker, "w") as handle:
        json.dump({"archive": path, **counts}, handle)
    print(", ".join(f"{count:,} {kind}" for kind, count in sorted(counts.items())) + f" from {path}")


def ensure_images(cfg, link, local):
    """The real images on the machine's disk (unpacked once per session, when a step needs them); the KEY VALUE
    pairs that point the config's image folders at them."""
    local = local_dir(local)
    if not os.path.exists(os.path.join(local, ".images_unpacked")):
        unpack_images(archive(link, "IMAGES_ARCHIVE", local), os.path.dirname(cfg.data.splits_json), local)
    return [word for pair in image_folders(local).items() for word in pair]


def prepare_captions(cfg, link, local):
    """The captions, splits and type files in the config's data folder, then the vocabulary, the label file and the
    evaluation ground truth built from them. Skipped when all are there."""
    data = cfg.data
    data_dir = os.path.dirname(data.splits_json)
    require_drive(data_dir)
    made = (data.splits_json, data.type_mapping_json, data.vocab_json, data.h5_label_file, data.anno_json)
    if all(os.path.isfile(path) for path in made):
        print(f"captions, splits, vocabulary and labels are in {data_dir}: nothing to do")
        return
    ensure_images(cfg, link, local)
    if not (os.path.isfile(data.vocab_json) and os.path.isfile(data.h5_label_file)):
        check(["python", "scripts/preprocess_captions_transformer.py",
               "--input_captions_json", os.path.join(data_dir, "change_captions.json"),
               "--input_neg_captions_json", os.path.join(data_dir, "no_change_captions.json"),
               "--input_image_dir", image_folders(local)["data.default_img_dir"], "--split_json", data.splits_json,
               "--output_vocab_json", data.vocab_json, "--output_h5", data.h5_label_file], "preprocessing the captions")
    if not os.path.isfile(data.anno_json):
        check(["python", "scripts/make_reference_captions.py",
               "--input_captions_json", os.path.join(data_dir, "change_captions.json"),
               "--input_neg_captions_json", os.path.join(data_dir, "no_change_captions.json"),
               "--output_json", data.anno_json], "building the evaluation ground truth")


def make_synthetic(cfg_path, cfg, scenes):
    """The synthetic data set in the config's data folder, as `make demo` makes it; each stage skipped when done."""
    from utils import synthetic_data
    from utils.feature_store import FEATURE_SETS

    folder = os.path.dirname(cfg.data.splits_json)
    if not synthetic_data.generated(folder):
        check(synthetic_data.generate_command(folder, scenes), "generating the synthetic scenes")
    for feature_set in FEATURE_SETS:
        images, features = (cfg.data[key.split(".")[1]] for key in (feature_set.image_key, feature_set.feature_key))
        if not synthetic_data.extracted(folder, os.path.relpath(images, folder), os.path.relpath(features, folder)):
            check(["python", "scripts/extract_features.py", "--cfg", cfg_path, "--input_image_dir", images,
                   "--output_dir", features, "--batch_size", "50"], "extracting the features")
    if not synthetic_data.preprocessed(folder):
        check(synthetic_data.preprocess_command(folder), "preprocessing the captions")


# ------------------------------------------------------------------ the feature store
def packed_ids(path):
    """(the scene ids whose three images are packed, all the ids of its rows) of the store file at ``path`` (a
    finished store, or an unfinished pack); two empty sets when there is no such file."""
    import h5py

    if not os.path.isfile(path):
        return set(), set()
    try:
        with h5py.File(path, "r", locking=False) as f:
            ids = [int(i) for i in f["ids"][()]] if "ids" in f else []
            written = f["written"][()].all(axis=0) if "written" in f else [False] * len(ids)
    except (OSError, KeyError) as err:
        raise Stop(f"{path} cannot be read ({err}); delete it and run this cell again") from None
    return {i for i, done in zip(ids, written) if done}, set(ids)


def choose_splits(missing_bytes, free, reserve=EXPERIMENT_RESERVE):
    """The splits to pack onto Drive now: all three when they fit beside the experiment, else training and
    validation (the test split is packed onto the machine's disk when testing); None when not even those fit.

    missing_bytes: {split: bytes of the split's images not packed yet}.
    """
    everything = sum(missing_bytes.values())
    if everything + reserve <= free:
        return ["train", "val", "test"]
    if missing_bytes["train"] + missing_bytes["val"] + reserve <= free:
        return ["train", "val"]
    return None


def image_bytes(cfg):
    """Bytes of one image's features in a float16 store: (feat_dim - 2) channels on the grid (an upper bound)."""
    encoder = cfg.model.change_detector
    return (encoder.feat_dim - 2) * encoder.grid * encoder.grid * STORE_ITEMSIZE


def plan_store(cfg, free=None):
    """The splits to pack into the config's store now: all three when they fit beside the experiment, else the
    training and validation splits; Stop when not even those fit. An unfinished pack goes on with the splits it
    was started with (the packer checks the space it needs)."""
    from utils.feature_store import PARTIAL
    from utils.packing import wanted_ids

    store = cfg.data.feature_store
    done, rows = packed_ids(store + PARTIAL)
    if rows:
        splits = [split for split in ("train", "val", "test") if split != "test" or set(wanted_ids(cfg, ["test"])) & rows]
        print(f"{store + PARTIAL}, a pack that did not finish, holds {len(done):,} of its {len(rows):,} scenes: "
              f"going on with it ({', '.join(splits)})")
        return splits
    have = packed_ids(store)[0]
    missing = {split: [i for i in wanted_ids(cfg, [split]) if i not in have] for split in ("train", "val", "test")}
    if not any(missing.values()):
        return ["train", "val", "test"]
    per_scene = 3 * image_bytes(cfg)
    missing_bytes = {split: len(ids) * per_scene for split, ids in missing.items()}
    folder = os.path.dirname(os.path.abspath(store))
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free if free is None else free
    splits = choose_splits(missing_bytes, free)
    where = "Google Drive" if on_drive(store) else folder
    if splits is None:
        raise Stop(f"{where} has {size_text(free)} free, and the training and validation features need "
                   f"{size_text(missing_bytes['train'] + missing_bytes['val'])} beside about "
                   f"{size_text(EXPERIMENT_RESERVE)} for the experiment. Make room: delete files from Drive and empty "
                   f"its trash (deleted files count until then), or get more Drive storage; or set WORK_DIR in "
                   f"{PARAMETERS} to a folder under /content (the machine's disk: a disconnect then loses the store)")
    print(f"{where}: {size_text(free)} free; not packed yet: " + ", ".join(
        f"{split} {len(ids):,} scenes ({size_text(missing_bytes[split])})" for split, ids in missing.items()))
    if "test" not in splits:
        print("the test split does not fit beside them: it is packed onto the machine's disk when testing (step 8)")
    return splits


def pack_command(cfg_path, extra, source, splits, output=None):
    kind, where = source
    # The overrides before --splits, which takes every word after it.
    return (["python", "scripts/pack_features.py", "--cfg", cfg_path, *extra, f"--from_{kind}", where]
            + (["--output", output] if output else []) + ["--splits", *splits])


def feature_source(data, cfg, link, local):
    """What the packer reads: the features archive of the course, or the synthetic data's feature folders."""
    if data == "synthetic":
        return "folders", os.path.dirname(cfg.data.default_feature_dir)
    return "archive", archive(link, "FEATURES_ARCHIVE", local_dir(local))


def training_store(cfg, local):
    """The store training reads: a copy on the machine's disk of a store on Drive (Drive is slow at the random reads
    of training), made once per session through a temporary name; the store itself elsewhere."""
    store = cfg.data.feature_store
    if not store or not on_drive(store):
        return store
    copy = os.path.join(local_dir(local), os.path.basename(store))
    size = os.path.getsize(store)
    if os.path.isfile(copy) and os.path.getsize(copy) == size and os.path.getmtime(copy) >= os.path.getmtime(store):
        return copy
    free = shutil.disk_usage(local).free
    if free < size:
        raise Stop(f"the machine's disk ({local}) has {size_text(free)} free, and the copy of {store} needs "
                   f"{size_text(size)}: delete downloads under {local} that are done with, then run this cell again")
    print(f"copying {store} ({size_text(size)}) to the machine's disk: training reads it many times over", flush=True)
    start = time.time()
    shutil.copyfile(store, copy + ".tmp")
    os.replace(copy + ".tmp", copy)
    print(f"copied in {time.time() - start:.0f} s")
    return copy


def feature_store(cfg_path, cfg, extra, data, link, local):
    """The store of the training and validation ids (and the test ids when they fit) packed next to the config's
    data.feature_store; the path training reads. Empty for a config that reads the feature folders."""
    store = cfg.data.feature_store
    if not store:
        print("this config reads the feature folders (data.feature_store is empty): nothing to pack")
        return ""
    from utils.packing import wanted_ids

    require_drive(store)
    splits = plan_store(cfg)
    if set(wanted_ids(cfg, splits)) <= packed_ids(store)[0]:
        print(f"{store} holds every scene id of {', '.join(splits)}: nothing to pack")
    else:
        check(pack_command(cfg_path, extra, feature_source(data, cfg, link, local), splits), "packing")
    return training_store(cfg, local)


def test_store(cfg_path, cfg, extra, data, link, local, store):
    """The store test.py and the figures read: the training store when it holds the test ids, else the test split
    packed onto the machine's disk now (after a disconnect, again)."""
    from utils.packing import wanted_ids

    if not store:
        return store
    needed = set(wanted_ids(cfg, ["test"]))
    if needed <= packed_ids(store)[0]:
        return store
    stem, extension = os.path.splitext(os.path.basename(cfg.data.feature_store))
    output = os.path.join(local_dir(local), f"{stem}_test{extension}")
    if not needed <= packed_ids(output)[0]:
        check(pack_command(cfg_path, extra, feature_source(data, cfg, link, local), ["test"], output),
              "packing the test split")
    return output


def store_overrides(cfg, store):
    """data.feature_store STORE when the steps read another file than the config names."""
    return ["data.feature_store", store] if store and store != cfg.data.feature_store else []


# ------------------------------------------------------------------ snippets
def check_snippets():
    """`make snippets` (the table of the six snippets); Stop listing the snippets still to write, or when one
    differs from the solution."""
    from utils.assignment import SNIPPETS, missing_snippets

    status, _ = run(["python", "-m", "pytest", "-q", "tests/test_snippets.py"])
    missing = sorted(missing_snippets(), key=lambda m: SNIPPETS.index(m[0]))
    if missing:
        raise Stop(f"{len(missing)} of {len(SNIPPETS)} snippets are not implemented yet: "
                   + ", ".join(f"{name} ({path})" for name, path in missing)
                   + ". Write them in their `== To Implement ==` blocks (on Colab: open the files from the Files pane "
                     "on the left), then run this cell again")
    if status:
        raise Stop("a snippet differs from the solution: the table above says which and how; fix it, then run this "
                   "cell again")
    print("all six snippets match the solution")


# ------------------------------------------------------------------ training
def experiment(cfg):
    """The experiment folder's layout (utils/layout.py): its root and every path in it."""
    from utils.layout import ExperimentLayout

    return ExperimentLayout.of(cfg)


def finished(cfg):
    """True when the last snapshot exists and its validation was recorded (nothing left for --resume to do)."""
    from utils.checkpoint import list_snapshots
    from utils.experiment import read_metrics

    if cfg.train.max_iter not in list_snapshots(cfg):
        return False
    records = read_metrics(experiment(cfg).metrics)
    return any(r.get("split") == "val" and r.get("iteration") == cfg.train.max_iter for r in records)


def resume_flag(cfg):
    """--resume when the experiment holds snapshots (a disconnect or a stop interrupted it)."""
    from utils.checkpoint import list_snapshots

    return ["--resume"] if list_snapshots(cfg) else []


def training_amp(cfg, gpu):
    """The train.amp of an experiment that is resumed (a resume keeps its config), else the GPU's choice."""
    import yaml

    path = experiment(cfg).config
    if resume_flag(cfg) and os.path.isfile(path):
        with open(path) as handle:
            return yaml.safe_load(handle)["train"]["amp"]
    return gpu.amp if gpu.id >= 0 else cfg.train.amp


def show_dashboard(cfg, local):
    """SimpleNamespace(shown, server). On Colab: the visdom server of cfg's port (started once, it outlives the
    cell: ``server`` is its process when this call started it) shown in an output frame. Elsewhere, or when the
    server fails, shown is False: the training cell then draws the curves itself."""
    if not in_colab():
        print("outside Colab the curves below are drawn from metrics.jsonl (a visdom server of your own, "
              "`python -m visdom.server`, shows the dashboard too)")
        return SimpleNamespace(shown=False, server=None)
    from google.colab import output

    from utils.logger import visdom_env_name
    from utils.visdom_server import VisdomServerError, start_server, wait_for_index

    port, server = cfg.logger.port, None
    log_path = os.path.join(local_dir(local), "visdom_server.log")
    try:
        if not port_open(port):
            with open(log_path, "a") as log:
                server = start_server(port, os.path.join(local, "visdom_env"), log)
            wait_for_index(port, server, timeout=120)  # the first start downloads visdom's web files
        output.serve_kernel_port_as_iframe(port, path=f"/env/{visdom_env_name(cfg.exp_name)}", height=900)
    except (VisdomServerError, OSError) as err:
        print(f"the dashboard cannot be shown ({err}; see {log_path}): the curves below are drawn from metrics.jsonl")
        return SimpleNamespace(shown=False, server=server)
    return SimpleNamespace(shown=True, server=server)


def port_open(port):
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def curves_png(records):
    """PNG of the training losses and the validation scores of metrics.jsonl records; None before the first."""
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    figure = Figure(figsize=(12, 4), dpi=80)
    losses, scores = figure.subplots(1, 2)
    for key in ("total", "caption", "cross_view", "cross_modal"):
        points = [(r["iteration"], r[key]) for r in train if r.get(key) is not None]
        if points:
            losses.plot(*zip(*points), label=key)
    losses.set(title="training losses", xlabel="iteration")
    for key in ("CIDEr", "BLEU-4"):
        points = [(r["iteration"], 100 * r[key]) for r in val if r.get(key) is not None]
        if points:
            scores.plot(*zip(*points), marker="o", label=key)
    scores.set(title="validation scores x 100", xlabel="iteration")
    for axes in (losses, scores):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class LiveView:
    """Two output areas of the running cell, updated in place: the last lines of the log, and the curves."""

    def __init__(self, curves):
        from IPython.display import Pretty, display

        self.text = display(Pretty("starting ..."), display_id=True)
        self.figure = display(Pretty(""), display_id=True) if curves else None

    def show(self, lines, png):
        from IPython.display import Image, Pretty

        if self.text is not None:
            self.text.update(Pretty("\n".join(lines)))
        if self.figure is not None and png is not None:
            self.figure.update(Image(data=png, format="png"))


def read_tail(path, count=15):
    with open(path, "rb") as handle:
        handle.seek(max(0, os.path.getsize(path) - 20000))
        return last_lines(handle.read().decode("utf-8", "replace"), count)


def watch(command, log_path, metrics_path, view, refresh):
    """Runs training in the background and shows its last lines (and, with curves, the curves of metrics.jsonl)
    every ``refresh`` seconds until it ends. The Stop button makes training save a snapshot and stop (SIGINT).
    Returns (exit status, last lines)."""
    from utils.experiment import read_metrics

    command = [sys.executable if i == 0 and word == "python" else str(word) for i, word in enumerate(command)]
    with open(log_path, "ab") as log:
        log.write(f"$ {shown(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    seen = None
    while True:
        try:
            try:
                proc.wait(timeout=refresh)
            except subprocess.TimeoutExpired:
                pass
            stamp = os.stat(metrics_path).st_mtime_ns if os.path.exists(metrics_path) else None
            png = curves_png(read_metrics(metrics_path)) if view.figure is not None and stamp != seen else None
            seen = stamp
            view.show(read_tail(log_path), png)
            if proc.poll() is not None:
                return proc.returncode, read_tail(log_path, 200)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # train.py ends the step, saves its snapshot and exits


def train(cfg_path, cfg, extra, gpu, store, local, refresh):
    """Trains (or resumes, or finds training done), with the dashboard or the curves; Stop when training fails."""
    layout = experiment(cfg)
    root = layout.root
    require_drive(root)
    if finished(cfg):
        print(f"{root} holds the last snapshot ({cfg.train.max_iter}) and its validation: training is done. To "
              f"train again, pick another exp_name (EXTRA) or delete the folder")
        return
    resume = resume_flag(cfg)
    amp = training_amp(cfg, gpu)
    dashboard = show_dashboard(cfg, local).shown
    overrides = list(extra) + store_overrides(cfg, store) + ["train.amp", amp, "logger.visdom", str(dashboard)]
    command = ["python", "train.py", "--cfg", cfg_path, "--gpu", str(gpu.id), *resume, *overrides]
    log_path = os.path.join(local_dir(local), "train_output.log")
    print(("resuming: " if resume else "") + shown(command) + f"\n(its whole output: {log_path})", flush=True)
    status, lines = watch(command, log_path, layout.metrics, LiveView(curves=not dashboard),
                          refresh)
    print(f"train.py exit status {status}")
    if status:
        raise Stop(failure("training", status, "\n".join(lines)))


# ------------------------------------------------------------------ the hand-in
def download_to_laptop(path):
    """On Colab, the browser downloads the file; elsewhere it is where it was written."""
    if in_colab():
        from google.colab import files

        files.download(path)
    print(f"{os.path.abspath(path)}: {os.path.getsize(path):,} bytes")
