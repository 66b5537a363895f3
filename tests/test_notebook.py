"""notebooks/assignment.ipynb, the assignment in a browser: run top to bottom on the CPU on tiny data given as the
course gives the real data (two archives), its text twin in sync, and the functions of utils/notebook.py behind its
Colab-only parts, each with a stand-in for Colab."""
import ast
import glob
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import types
import zipfile

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.helpers import FAST, ROOT, tiny_cfg, write_cfg
from utils import notebook as nb
from utils.assignment import ASSIGNMENT_FILES, SNIPPETS, missing_snippets
from utils.synthetic_data import data_overrides

NOTEBOOK = os.path.join(ROOT, "notebooks", "assignment.ipynb")
TWIN = os.path.join(ROOT, "notebooks", "assignment.py")


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def parameter_names():
    cell = code_cells(read_notebook())[0]
    return [target.id for node in ast.parse(cell.source).body for target in node.targets]


def execute(parameters, timeout=600):
    """Runs the notebook with its parameters cell replaced; (the executed notebook, the CellExecutionError or None)."""
    assert sorted(parameters) == sorted(parameter_names()), "the test sets every parameter of the notebook"
    notebook = read_notebook()
    cell = code_cells(notebook)[0]
    assert cell.metadata.get("tags") == ["parameters"]
    cell.source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    try:
        client.execute()
    except CellExecutionError as error:
        return notebook, error
    return notebook, None


def errors(notebook):
    """[(index among the code cells, the error output)] of the executed notebook."""
    return [(index, output) for index, cell in enumerate(code_cells(notebook)) for output in cell.get("outputs", [])
            if output.output_type == "error"]


def text_of(cell):
    return "".join(output.get("text", "") for output in cell.get("outputs", []))


def course_archives(data, folder):
    """clevr_change.tar.gz (images and json files under data/) and clevr_change_features.tar.gz (the three feature
    folders) of a data set, laid out as the real archives are."""
    os.makedirs(folder, exist_ok=True)
    images, features = os.path.join(folder, "clevr_change.tar.gz"), os.path.join(folder, "clevr_change_features.tar.gz")
    with tarfile.open(images, "w:gz") as tar:
        for name in ("images", "sc_images", "nsc_images"):
            tar.add(data[name], arcname=f"data/{name}")
        for path in sorted(glob.glob(os.path.join(data["root"], "*.json"))):
            if os.path.basename(path) != "feature_settings.json":
                tar.add(path, arcname=f"data/{os.path.basename(path)}")
    with tarfile.open(features, "w:gz") as tar:
        for name in ("features", "sc_features", "nsc_features"):
            tar.add(data[name], arcname=name)
    return images, features


@pytest.fixture(scope="module")
def course(tiny_data, tmp_path_factory):
    """The tiny data set's two archives and a config of the notebook's real-data path: its data folder empty
    (the notebook fills it), a feature store named there, its own experiment folder."""
    root = tmp_path_factory.mktemp("notebook")
    images, features = course_archives(tiny_data, str(root / "course"))
    data_dir = str(root / "work" / "data")
    pairs = data_overrides(data_dir)
    paths = dict(zip(pairs[0::2], pairs[1::2]))
    cfg = tiny_cfg(tiny_data, **paths, **FAST, **{"data.feature_store": os.path.join(data_dir, "tiny.h5"),
                                                  "exp_dir": str(root / "work" / "experiments"), "exp_name": "nb",
                                                  "train.max_iter": 2, "train.snapshot_interval": 2})
    return types.SimpleNamespace(root=root, images=images, features=features, cfg=cfg,
                                 cfg_path=write_cfg(cfg, root, "tiny.yaml"))


def tiny_parameters(course, tmp_path):
    return {"HANDOUT": "", "IMAGES_ARCHIVE": course.images, "FEATURES_ARCHIVE": course.features,
            "DATA": "clevr_change", "CFG": course.cfg_path, "WORK_DIR": str(tmp_path / "drive"),
            "LOCAL_DIR": str(tmp_path / "local"), "SYNTHETIC_SCENES": 0, "EXTRA": ["train.log_interval", "1"],
            "REFRESH_SECONDS": 1}


def cell_index(notebook, call):
    return next(i for i, cell in enumerate(code_cells(notebook)) if call in cell.source)


def stopped_at_the_snippets(notebook, error):
    """In the untouched handout: True after checking that the notebook stopped at the snippets cell with the list of
    those to write (a message, no traceback) and ran nothing after it. False when every snippet is written."""
    missing = missing_snippets()
    if not missing:
        return False
    assert error is not None and error.ename == "Stop", error
    [(index, output)] = errors(notebook)
    assert index == cell_index(notebook, "nb.check_snippets()")
    assert output.traceback == [f"Stopped: {output.evalue}"]
    assert f"{len(missing)} of {len(SNIPPETS)} snippets are not implemented yet" in output.evalue
    for name, path in missing:
        assert f"{name} ({path})" in output.evalue
    assert all(not cell.get("outputs") for cell in code_cells(notebook)[index + 1:])
    return True


def test_the_notebook_runs_top_to_bottom_on_tiny_data(course, tmp_path):
    notebook, error = execute(tiny_parameters(course, tmp_path))
    if stopped_at_the_snippets(notebook, error):
        return
    assert error is None, errors(notebook)
    cells = code_cells(notebook)
    assert all(cell.execution_count for cell in cells)
    exp = os.path.join(course.cfg.exp_dir, course.cfg.exp_name)
    assert os.path.isfile(os.path.join(exp, "report", "report.html"))
    with zipfile.ZipFile(os.path.join(exp, "submission.zip")) as handed_in:
        assert sorted(handed_in.namelist()) == sorted(ASSIGNMENT_FILES + ("report.html",))
    # The steps did what their text says: the store packed from the archive with all three splits (the disk has
    # room), the snippets table shown, training to the last snapshot with its curves drawn (outside Colab).
    from utils.feature_store import FeatureStore
    from utils.packing import wanted_ids

    assert set(wanted_ids(course.cfg)) <= set(FeatureStore(course.cfg.data.feature_store).ids)
    assert "matches the solution" in text_of(cells[cell_index(notebook, "nb.check_snippets()")])
    assert os.path.isfile(os.path.join(exp, "snapshots", "nb_checkpoint_2.pt"))
    training = cells[cell_index(notebook, "nb.train(")]
    assert "train.py exit status 0" in text_of(training)
    assert any("image/png" in output.get("data", {}) for output in training.outputs)


def test_the_text_twin_holds_the_notebook_cell_by_cell():
    import jupytext

    twin = jupytext.read(TWIN, fmt="py:percent")
    notebook = read_notebook()
    fix = "edit one and run `python -m jupytext --sync notebooks/assignment.ipynb`"
    assert [(c.cell_type, c.source, c.metadata.get("tags")) for c in twin.cells] == \
           [(c.cell_type, c.source, c.metadata.get("tags")) for c in notebook.cells], fix
    for key in ("kernelspec", "accelerator", "colab"):
        assert twin.metadata.get(key) == notebook.metadata.get(key), (key, fix)
    assert notebook.metadata["accelerator"] == "GPU"  # Colab opens it on a GPU runtime
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code_cells(notebook)), \
        "the notebook is kept without outputs"
    assert code_cells(notebook)[0].metadata.get("tags") == ["parameters"]


# ------------------------------------------------------------------ the functions behind the cells
@pytest.fixture
def colab(monkeypatch):
    """A stand-in for Colab's google.colab (drive, output, files): its calls are recorded in the returned list."""
    calls = []
    if "google" not in sys.modules:
        monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    package = types.ModuleType("google.colab")
    package.drive = types.SimpleNamespace(mount=lambda path: calls.append(("mount", path)))
    package.output = types.SimpleNamespace(
        serve_kernel_port_as_iframe=lambda port, path="/", height=400: calls.append(("frame", port, path)))
    package.files = types.SimpleNamespace(download=lambda path: calls.append(("download", path)))
    monkeypatch.setitem(sys.modules, "google.colab", package)
    return calls


def test_a_stop_shows_its_message_alone():
    assert nb.Stop("do this")._render_traceback_() == ["Stopped: do this"]


def test_drive_not_mounted_names_the_cell_that_mounts_it(monkeypatch, tmp_path):
    monkeypatch.setattr(nb, "DRIVE", str(tmp_path / "drive"))
    store = str(tmp_path / "drive" / "MyDrive" / "scorer_cbr" / "data" / "store.h5")
    with pytest.raises(nb.Stop, match=r"Drive is not mounted .* run the set-up cell \(1\. Set-up: the handout\) again"):
        nb.require_drive(store)
    nb.require_drive(str(tmp_path / "elsewhere" / "store.h5"))  # not on Drive: nothing to check
    os.makedirs(tmp_path / "drive" / "MyDrive")
    nb.require_drive(store)


def test_an_archive_link_not_filled_in_or_not_a_file_says_what_to_set(tmp_path):
    with pytest.raises(nb.Stop, match=r"^IMAGES_ARCHIVE is empty: the course puts its link in the first code cell"):
        nb.archive("", "IMAGES_ARCHIVE", str(tmp_path))
    with pytest.raises(nb.Stop, match=r"is a Google Drive page .* Add shortcut"):
        nb.archive("https://drive.google.com/file/d/abc/view?usp=sharing", "FEATURES_ARCHIVE", str(tmp_path))
    with pytest.raises(nb.Stop, match=r"FEATURES_ARCHIVE = .*nothing.tar.gz is not a file"):
        nb.archive(str(tmp_path / "nothing.tar.gz"), "FEATURES_ARCHIVE", str(tmp_path))
    (tmp_path / "there.tar.gz").write_bytes(b"x")
    assert nb.archive(str(tmp_path / "there.tar.gz"), "FEATURES_ARCHIVE", str(tmp_path)) == str(tmp_path / "there.tar.gz")


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves server.body at /archive.tar.gz, honouring Range when server.ranges; records the bytes it sent."""

    def do_GET(self):
        if self.path != "/archive.tar.gz":
            self.send_error(404)
            return
        asked = self.headers.get("Range")
        start = int(asked.split("=")[1].split("-")[0]) if asked and self.server.ranges else 0
        self.send_response(206 if start else 200)
        body = self.server.body[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.sent.append(len(body))

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.body, server.ranges, server.sent = os.urandom(3_000_000), True, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_download_resumes_where_it_stopped_and_names_what_went_wrong(web, tmp_path):
    url = f"http://127.0.0.1:{web.server_address[1]}/archive.tar.gz"
    target = tmp_path / "downloads" / "archive.tar.gz"
    os.makedirs(target.parent)
    (tmp_path / "downloads" / "archive.tar.gz.partial").write_bytes(web.body[:1_000_000])  # a disconnect
    assert nb.archive(url, "FEATURES_ARCHIVE", str(tmp_path)) == str(target)
    assert target.read_bytes() == web.body and web.sent == [2_000_000]
    assert not os.path.exists(str(target) + ".partial")
    assert nb.download(url, str(target)) == str(target) and web.sent == [2_000_000]  # done: not fetched again

    web.ranges = False  # a server that sends the whole file: the partial one is started over
    other = tmp_path / "other.tar.gz"
    (tmp_path / "other.tar.gz.partial").write_bytes(b"stale bytes")
    nb.download(url, str(other))
    assert other.read_bytes() == web.body

    with pytest.raises(nb.Stop, match=r"answered HTTP 404 .* check the link in the first code cell"):
        nb.download(url.replace("archive", "missing"), str(tmp_path / "missing.tar.gz"))
    with pytest.raises(nb.Stop, match=r"failed .*; run this cell again: it goes on where it stopped"):
        nb.download("http://127.0.0.1:9/archive.tar.gz", str(tmp_path / "refused.tar.gz"))


def test_no_gpu_on_colab_stops_the_real_data_with_the_menu_to_use(monkeypatch, colab, capsys):
    import utils.device

    monkeypatch.setattr(utils.device, "_cuda_diagnosis", lambda: (False, "this torch is a CPU-only build"))
    with pytest.raises(nb.Stop, match=r"no usable GPU: this torch is a CPU-only build\. Training on the real data "
                                      r"needs a GPU: Runtime > Change runtime type > T4 GPU"):
        nb.gpu_check("clevr_change")
    assert nb.gpu_check("synthetic").id == -1
    assert "Runtime > Change runtime type > T4 GPU" in capsys.readouterr().out


def test_a_gpu_below_compute_capability_8_trains_in_fp16(monkeypatch, capsys):
    import torch
    import utils.device

    monkeypatch.setattr(utils.device, "_cuda_diagnosis", lambda: (True, ""))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=15 * 2 ** 30))
    for capability, amp in (((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        assert vars(nb.gpu_check("clevr_change")) == {"id": 0, "amp": amp}
    assert "GPU 0: Tesla T4, compute capability 7.5, 15 GiB: training uses train.amp fp16" in capsys.readouterr().out


def test_the_splits_go_to_drive_when_they_fit_beside_the_experiment():
    reserve = nb.EXPERIMENT_RESERVE
    sizes = {"train": 10, "val": 2, "test": 5}
    assert nb.choose_splits(sizes, 17 + reserve) == ["train", "val", "test"]
    assert nb.choose_splits(sizes, 16 + reserve) == ["train", "val"]
    assert nb.choose_splits(sizes, 12 + reserve) == ["train", "val"]
    assert nb.choose_splits(sizes, 11 + reserve) is None


def test_a_drive_too_small_for_the_store_says_how_to_make_room(tiny_data, tmp_path, capsys):
    cfg = tiny_cfg(tiny_data, **{"data.feature_store": str(tmp_path / "store.h5")})
    per_scene = 3 * nb.image_bytes(cfg)
    assert per_scene == 3 * 256 * 4 * 4 * 2  # feat_dim 258 - 2 channels on the 4 x 4 grid, float16
    assert nb.plan_store(cfg, free=10 ** 12) == ["train", "val", "test"]
    counts = {split: len(json.load(open(tiny_data["splits"]))[split]) for split in ("train", "val", "test")}
    just_train_val = (counts["train"] + counts["val"]) * per_scene + nb.EXPERIMENT_RESERVE
    assert nb.plan_store(cfg, free=just_train_val) == ["train", "val"]
    assert "it is packed onto the machine's disk when testing (step 8)" in capsys.readouterr().out
    with pytest.raises(nb.Stop, match=r"has 1\.0 GB free, and the training and validation features need .* empty its "
                                      r"trash .* set WORK_DIR in the first code cell"):
        nb.plan_store(cfg, free=just_train_val - 1)


def test_a_store_too_big_for_drive_trains_from_drive_and_tests_from_the_local_disk(
        course, tiny_data, tmp_path, monkeypatch):
    from utils.feature_store import FeatureStore
    from utils.packing import wanted_ids

    monkeypatch.setattr(nb, "DRIVE", str(tmp_path / "drive"))
    os.makedirs(tmp_path / "drive" / "MyDrive")
    store = str(tmp_path / "drive" / "MyDrive" / "store.h5")
    cfg = tiny_cfg(tiny_data, **{"data.feature_store": store})
    cfg_path = write_cfg(cfg, tmp_path)
    per_scene = 3 * nb.image_bytes(cfg)
    train_val = len(wanted_ids(cfg, ["train", "val"])) * per_scene + nb.EXPERIMENT_RESERVE
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=train_val + per_scene // 2))
    local = str(tmp_path / "local")
    training = nb.feature_store(cfg_path, cfg, [], "clevr_change", course.features, local)
    assert sorted(FeatureStore(store).ids) == wanted_ids(cfg, ["train", "val"])
    assert training == os.path.join(local, "store.h5")  # the copy on the machine's disk
    assert open(training, "rb").read() == open(store, "rb").read()
    copied_at = os.path.getmtime(training)
    assert nb.training_store(cfg, local) == training and os.path.getmtime(training) == copied_at  # once a session

    tested = nb.test_store(cfg_path, cfg, [], "clevr_change", course.features, local, training)
    assert tested == os.path.join(local, "store_test.h5")
    assert sorted(FeatureStore(tested).ids) == wanted_ids(cfg, ["test"])
    assert nb.store_overrides(cfg, tested) == ["data.feature_store", tested]


def test_a_pack_cut_off_by_a_disconnect_goes_on_when_the_cell_runs_again(course, tiny_data, tmp_path, capsys):
    import numpy as np

    from utils.extraction import settings_from_config
    from utils.feature_store import FEATURE_SETS, FeatureStore, StoreWriter
    from utils.packing import wanted_ids

    store = str(tmp_path / "store.h5")
    cfg = tiny_cfg(tiny_data, **{"data.feature_store": store})
    ids = wanted_ids(cfg)
    # A pack of every split that stopped after five scenes: what a lost connection leaves.
    with StoreWriter(store, ids, settings_from_config(cfg.data.extraction), "float16", "archive", "pack") as writer:
        for scene in ids[:5]:
            for feature_set in FEATURE_SETS:
                name = feature_set.image_name % scene
                feature = np.load(os.path.join(tiny_data[feature_set.name], name + ".npy"))
                writer.write(feature_set.name, scene, name, feature, name)
    assert os.path.isfile(store + ".partial") and not os.path.exists(store)
    assert nb.plan_store(cfg, free=0) == ["train", "val", "test"]  # the packer checks the space of the rest
    assert f"a pack that did not finish, holds 5 of its {len(ids)} scenes" in capsys.readouterr().out
    assert nb.feature_store(write_cfg(cfg, tmp_path), cfg, [], "clevr_change", course.features,
                            str(tmp_path / "local")) == store
    assert f"resuming {store}.partial: 15 images already packed" in capsys.readouterr().out
    assert sorted(FeatureStore(store).ids) == ids


def test_snippets_to_write_are_listed_in_the_table_order(monkeypatch):
    import utils.assignment

    monkeypatch.setattr(nb, "run", lambda command: (0, ""))
    monkeypatch.setattr(utils.assignment, "missing_snippets",
                        lambda: [("Attention", "models/SCORER.py"), ("CBR.CrossEn", "models/CBR.py")])
    with pytest.raises(nb.Stop, match=r"^2 of 6 snippets are not implemented yet: CBR\.CrossEn \(models/CBR\.py\), "
                                      r"Attention \(models/SCORER\.py\)\. Write them"):
        nb.check_snippets()
    monkeypatch.setattr(nb, "run", lambda command: (1, ""))
    monkeypatch.setattr(utils.assignment, "missing_snippets", lambda: [])
    with pytest.raises(nb.Stop, match="a snippet differs from the solution: the table above says which"):
        nb.check_snippets()


class _Recorder:
    """A stand-in for the training cell's live view; ``stop_when`` makes it press the Stop button."""

    def __init__(self, stop_when=lambda: False):
        self.figure, self.shown, self.pngs, self.stop_when = True, [], [], stop_when

    def show(self, lines, png):
        self.shown.append(lines)
        if png is not None:
            self.pngs.append(png)
        if self.stop_when():
            self.stop_when = lambda: False
            raise KeyboardInterrupt


@pytest.mark.snippets
def test_training_stopped_midway_goes_on_when_the_cell_runs_again(tiny_data, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(tiny_data, **FAST, **{"exp_dir": str(tmp_path / "experiments"), "exp_name": "stopped",
                                         "train.max_iter": 40, "train.snapshot_interval": 10})
    cfg_path = write_cfg(cfg, tmp_path)
    gpu = types.SimpleNamespace(id=-1, amp="none")
    snapshots = os.path.join(cfg.exp_dir, "stopped", "snapshots")
    views = [_Recorder(stop_when=lambda: os.path.isdir(snapshots) and os.listdir(snapshots)), _Recorder()]
    monkeypatch.setattr(nb, "LiveView", lambda curves: views.pop(0))
    local = str(tmp_path / "local")
    with pytest.raises(nb.Stop, match=r"^training was stopped \(Ctrl-C: stopped at iteration \d+; .*\); run this cell "
                                      r"again: it goes on where it stopped"):
        nb.train(cfg_path, cfg, [], gpu, "", local, 0.2)
    assert nb.resume_flag(cfg) == ["--resume"] and not nb.finished(cfg)
    nb.train(cfg_path, cfg, [], gpu, "", local, 0.2)
    out = capsys.readouterr().out
    assert "resuming: python train.py --cfg" in out and "train.py exit status 0" in out
    assert nb.finished(cfg)
    with open(os.path.join(local, "train_output.log")) as log:
        assert "resuming from" in log.read()
    nb.train(cfg_path, cfg, [], gpu, "", local, 0.2)
    assert "training is done" in capsys.readouterr().out


def test_curves_come_from_metrics_jsonl():
    assert nb.curves_png([]) is None
    records = [{"iteration": i, "split": "train", "total": 5.0 / i, "caption": 4.0 / i, "cross_view": 1.0,
                "cross_modal": 1.0} for i in (1, 2, 3)] + [{"iteration": 3, "split": "val", "CIDEr": 0.5, "BLEU-4": 0.2}]
    assert nb.curves_png(records).startswith(b"\x89PNG")


def test_the_dashboard_is_a_frame_on_colab_and_the_curves_elsewhere(colab, visdom_server, tmp_path, monkeypatch):
    import utils.visdom_server
    from configs.defaults import load_config
    from utils.visdom_server import VisdomServerError, free_port, stop_server

    cfg = load_config(None, ["exp_name", "SCORER+CBR_quick", "logger.port", str(free_port())])
    started = nb.show_dashboard(cfg, str(tmp_path))  # static files: installed by the visdom_server fixture
    try:
        assert started.shown and started.server is not None
        assert colab == [("frame", cfg.logger.port, "/env/SCORER-CBR_quick")]
        again = nb.show_dashboard(cfg, str(tmp_path))  # the cell run again: the running server is shown
        assert again.shown and again.server is None and len(colab) == 2
    finally:
        stop_server(started.server)

    def fails(port, proc, timeout):
        raise VisdomServerError("the visdom server exited with code 1")

    monkeypatch.setattr(utils.visdom_server, "wait_for_index", fails)
    cfg = load_config(None, ["logger.port", str(free_port())])
    failed = nb.show_dashboard(cfg, str(tmp_path))
    stop_server(failed.server)
    assert not failed.shown and len(colab) == 2
    monkeypatch.delitem(sys.modules, "google.colab")
    assert not nb.show_dashboard(cfg, str(tmp_path)).shown


def test_a_failing_tool_stops_with_its_own_error_line(capsys):
    failing = "import sys; print('working'); print('error: the archive is damaged', file=sys.stderr); sys.exit(2)"
    with pytest.raises(nb.Stop, match=r"^packing failed \(exit status 2\): error: the archive is damaged$"):
        nb.check(["python", "-c", failing], "packing")
    out = capsys.readouterr().out
    assert out.startswith("$ python -c ") and "working" in out


def test_the_images_archive_is_unpacked_by_file_name_only(tmp_path):
    def archive(name, members):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return str(path)

    members = {"data/images/CLEVR_default_000001.png": b"b", "data/sc_images/CLEVR_semantic_000001.png": b"s",
               "data/nsc_images/CLEVR_nonsemantic_000001.png": b"n", "data/splits.json": b"{}",
               "../../escape.json": b"[]", "data/README.txt": b"not needed"}
    data_dir, local = str(tmp_path / "data"), str(tmp_path / "local")
    nb.unpack_images(archive("clevr_change.tar.gz", members), data_dir, local)
    assert sorted(os.listdir(data_dir)) == ["escape.json", "splits.json"]  # by name: nothing lands outside
    assert open(os.path.join(local, "sc_images", "CLEVR_semantic_000001.png"), "rb").read() == b"s"
    assert os.path.exists(os.path.join(local, ".images_unpacked"))
    del members["data/sc_images/CLEVR_semantic_000001.png"]
    with pytest.raises(nb.Stop, match=r"holds no sc_images folder: is it clevr_change\.tar\.gz\? Check IMAGES_ARCHIVE"):
        nb.unpack_images(archive("other.tar.gz", members), data_dir, local)
    assert not os.path.exists(os.path.join(local, ".images_unpacked"))  # not complete: unpacked again next time


def test_install_on_colab_adds_the_requirements_and_java(colab, monkeypatch):
    commands = []
    monkeypatch.setattr(nb, "check", lambda command, step: commands.append(command))
    found = iter([None, "/usr/bin/java"])
    monkeypatch.setattr(shutil, "which", lambda name: next(found))
    nb.install()
    assert commands == [
        ["python", "-m", "pip", "install", "--quiet", "setuptools<81", "wheel"],
        ["python", "-m", "pip", "install", "--quiet", "--no-build-isolation", "-r", "requirements.txt"],
        ["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "default-jre-headless"]]


def test_a_missing_requirement_outside_colab_says_how_to_install(monkeypatch):
    monkeypatch.setattr(nb, "REQUIRED", nb.REQUIRED + ("no_such_module_for_this_test",))
    with pytest.raises(nb.Stop, match=r"lacks no_such_module_for_this_test: run `make setup`"):
        nb.install()


def run_set_up_cell(**parameters):
    """The notebook's set-up cell run here with the given parameters; returns its variables."""
    namespace = dict(parameters)
    folder = os.getcwd()
    try:
        exec(compile(code_cells(read_notebook())[1].source, "the set-up cell", "exec"), namespace)
    finally:
        os.chdir(folder)
    return namespace


def test_the_set_up_cell_fetches_the_handout_onto_drive_once(colab, tmp_path):
    made = tmp_path / "made" / "assignment"
    os.makedirs(made / "models")
    (made / "train.py").write_text("# the handout\n")
    (made / "models" / "CBR.py").write_text("# a student file\n")
    with tarfile.open(tmp_path / "assignment.tar.gz", "w:gz") as tar:
        tar.add(made, arcname="assignment")
    work = tmp_path / "work"
    assert run_set_up_cell(WORK_DIR=str(work), HANDOUT=str(tmp_path / "assignment.tar.gz"))["REPO"] == \
        str(work / "assignment")
    assert sorted(os.listdir(work)) == ["assignment"]  # no partial copy left
    (work / "assignment" / "models" / "CBR.py").write_text("# my snippets\n")
    run_set_up_cell(WORK_DIR=str(work), HANDOUT=str(tmp_path / "assignment.tar.gz"))  # after a disconnect
    assert (work / "assignment" / "models" / "CBR.py").read_text() == "# my snippets\n"

    git = ["git", "-C", str(made), "-c", "user.email=course@example.org", "-c", "user.name=course"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "handout"]):
        subprocess.run(git + command, check=True)
    cloned = run_set_up_cell(WORK_DIR=str(tmp_path / "cloned"), HANDOUT=str(made))["REPO"]
    assert os.path.isfile(os.path.join(cloned, "train.py"))

    with pytest.raises(SystemExit, match=r"HANDOUT is empty: the course puts the handout's git URL"):
        run_set_up_cell(WORK_DIR=str(tmp_path / "fresh"), HANDOUT="")
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"empty\.tar\.gz did not give the handout \(a folder with train\.py\)"):
        run_set_up_cell(WORK_DIR=str(tmp_path / "fresh"), HANDOUT=str(tmp_path / "empty.tar.gz"))
    assert not (tmp_path / "fresh" / "assignment").exists()
    assert colab == []  # the work folder is not on Drive: nothing mounted

    def declined(path):
        raise ValueError("mount failed")

    sys.modules["google.colab"].drive = types.SimpleNamespace(mount=declined)
    with pytest.raises(SystemExit, match=r"Google Drive did not mount \(mount failed\): run this cell again"):
        run_set_up_cell(WORK_DIR="/content/drive/MyDrive/scorer_cbr", HANDOUT="")


def test_the_zip_is_downloaded_on_colab(colab, tmp_path):
    (tmp_path / "submission.zip").write_bytes(b"zip")
    nb.download_to_laptop(str(tmp_path / "submission.zip"))
    assert colab == [("download", str(tmp_path / "submission.zip"))]


@pytest.mark.slow
def test_the_notebook_runs_on_the_demo_data(tmp_path):
    """The synthetic path on the demo's data set (data/demo, reused when `make demo` made it, else made here),
    with a short training of the demo config."""
    from configs.defaults import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "dynamic", "transformer_demo.yaml"),
                      ["exp_dir", str(tmp_path / "experiments"), "train.max_iter", "40", "train.snapshot_interval", "20"])
    notebook, error = execute({"HANDOUT": "", "IMAGES_ARCHIVE": "", "FEATURES_ARCHIVE": "", "DATA": "synthetic",
                               "CFG": write_cfg(cfg, tmp_path), "WORK_DIR": str(tmp_path / "drive"),
                               "LOCAL_DIR": str(tmp_path / "local"), "SYNTHETIC_SCENES": 2000, "EXTRA": [],
                               "REFRESH_SECONDS": 5}, timeout=3600)
    if not stopped_at_the_snippets(notebook, error):
        assert error is None, errors(notebook)
        exp = os.path.join(cfg.exp_dir, cfg.exp_name)
        assert os.path.isfile(os.path.join(exp, "report", "report.html"))
        assert os.path.isfile(os.path.join(exp, "submission.zip"))
