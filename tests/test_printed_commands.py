"""Every command a tool's error offers works as printed: each failing situation is set up on tiny generated data,
the command the error line offers is run exactly as printed (from the repository root), and it must succeed."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import evaluate
import test as test_script
from tests.helpers import ROOT, SMALL_MODEL, one_thread_env, tiny_cfg, write_cfg
from utils import dataset
from utils.layout import ExperimentLayout

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="evaluate.py needs Java")


def offered(text):
    """The commands in a message: each from `python ` to the next `;`, `(`, `, ` or the end, without a closing
    period."""
    return [found.strip().rstrip(".") for found in re.findall(r"python \S+\.py(?:(?!, )[^;(\n])*", text)]


def run_printed(command):
    """The command as printed, in a subprocess from the repository root ("python" is this interpreter)."""
    words = shlex.split(command)
    assert words[0] == "python", command
    return subprocess.run([sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True,
                          env=one_thread_env(), timeout=600)


def error_of(capsys, tool, argv):
    """The `error:` line of tool.main(argv), which must fail with exit status 2."""
    try:
        code = tool.main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return next(line for line in err.splitlines() if line.startswith("error: "))


def assert_works(command):
    done = run_printed(command)
    assert done.returncode == 0, (command, done.stderr[-2000:])
    return done


@pytest.fixture
def experiment(tiny_experiment, tmp_path):
    """A copy of the tiny trained experiment under tmp_path/experiments, and its config file."""
    cfg = tiny_experiment["cfg"].clone()
    cfg.defrost()
    cfg.exp_dir = str(tmp_path / "experiments")
    shutil.copytree(tiny_experiment["exp_root"], ExperimentLayout.of(cfg).root)
    return {"cfg": cfg, "cfg_file": write_cfg(cfg, tmp_path), "layout": ExperimentLayout.of(cfg),
            "data": tiny_experiment["data"]}


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    """A copy of the tiny data set (files may be removed from it) and a config file for it."""
    root = str(tmp_path / "data")
    shutil.copytree(tiny_data["root"], root, ignore=shutil.ignore_patterns("experiments"))
    paths = {key: value.replace(tiny_data["root"], root, 1) for key, value in tiny_data.items()}
    return {"paths": paths, "cfg_file": write_cfg(tiny_cfg(paths, **SMALL_MODEL), tmp_path)}


@pytest.mark.snippets  # the fixture trains the model
def test_a_gpu_that_cannot_be_used(experiment, capsys):
    error = error_of(capsys, test_script, ["--cfg", experiment["cfg_file"], "--snapshot", "best", "--gpu", "7"])
    [command] = offered(error.split("This works here: ")[1])
    assert command.endswith("--gpu 0") or command.endswith("--gpu -1")
    assert_works(command)


@pytest.mark.snippets  # the fixture trains the model
def test_a_snapshot_that_does_not_exist(experiment, capsys):
    error = error_of(capsys, test_script, ["--cfg", experiment["cfg_file"], "--snapshot", "99"])
    [command] = offered(error)
    assert command == f"python test.py --cfg {experiment['cfg_file']} --snapshot best"
    assert_works(command)


@needs_java
@pytest.mark.snippets  # the fixture trains the model
def test_the_assignment_sheets_evaluate_command_after_another_run(experiment, capsys):
    # The sheet's command (the paper config's folder, files under ./data) where only another experiment was trained.
    exp_dir = experiment["cfg"].exp_dir
    error = error_of(capsys, evaluate, ["--results_dir", f"{exp_dir}/SCORER+CBR/eval_sents", "--anno",
                                        "./data/total_change_captions_reformat.json", "--type_file",
                                        "./data/type_mapping.json"])
    [command] = offered(error)
    data = experiment["data"]
    assert command == (f"python evaluate.py --results_dir {experiment['layout'].val_captions} --anno {data['anno']} "
                       f"--type_file {data['type_mapping']}")  # the files its config.yaml names
    assert_works(command)
    assert os.path.isfile(experiment["layout"].val_scores)


@needs_java
@pytest.mark.snippets  # the fixture trains the model
def test_annotation_files_that_do_not_exist(experiment, capsys):
    test_captions = experiment["layout"].test_captions
    error = error_of(capsys, evaluate, ["--results_dir", test_captions, "--anno", "nothing.json"])
    assert "annotation file nothing.json (--anno) does not exist" in error
    [command] = offered(error)
    assert f"references: {experiment['data']['anno']}" in assert_works(command).stdout


def test_a_label_file_that_does_not_exist(data_copy, capsys):
    os.remove(data_copy["paths"]["h5"])
    error = error_of(capsys, dataset, ["--cfg", data_copy["cfg_file"], "--split", "val"])
    [command] = offered(error)
    assert command.startswith("python scripts/preprocess_captions_transformer.py")
    assert_works(command)
    dataset.main(["--cfg", data_copy["cfg_file"], "--split", "val"])  # the data reads again


def test_a_feature_folder_that_does_not_exist(data_copy, capsys):
    folder = data_copy["paths"]["nsc_features"]
    shutil.rmtree(folder)
    error = error_of(capsys, dataset, ["--cfg", data_copy["cfg_file"], "--split", "val"])
    [command] = offered(error)
    # The config's extraction settings (random ResNet-18), not the defaults (ImageNet ResNet-101).
    assert command.endswith(f"--output_dir {folder} --batch_size 128 --cfg {data_copy['cfg_file']}")
    assert_works(command)
    dataset.main(["--cfg", data_copy["cfg_file"], "--split", "val"])


def test_a_feature_store_that_does_not_exist(data_copy, tmp_path, capsys):
    store = str(tmp_path / "store.h5")
    error = error_of(capsys, dataset, ["--cfg", data_copy["cfg_file"], "data.feature_store", store])
    [command] = offered(error)
    assert command == (f"python scripts/pack_features.py --cfg {data_copy['cfg_file']} data.feature_store {store} "
                       f"--from_folders {data_copy['paths']['root']}")
    assert_works(command)
    dataset.main(["--cfg", data_copy["cfg_file"], "data.feature_store", store])


@pytest.mark.slow
@needs_java
@pytest.mark.snippets  # the fixture trains the model
def test_the_hand_in_checks_lead_to_a_complete_report(experiment):
    from scripts.make_submission import report_problems

    cfg, cfg_file, layout = experiment["cfg"], experiment["cfg_file"], experiment["layout"]
    shutil.rmtree(os.path.join(layout.root, "test_output"))
    problems, _ = report_problems(cfg, cfg_file)
    commands = [command for problem in problems for command in offered(problem)]
    assert [c.split()[1] for c in commands] == ["test.py", "scripts/visualize.py", "scripts/make_report.py"]
    assert_works(commands[0])
    assert_works(f"python evaluate.py --results_dir {layout.test_captions}")  # "then evaluate.py on ..."
    for command in commands[1:]:
        assert_works(command)
    assert report_problems(cfg, cfg_file)[0] == []
    # The report's notes offer commands too (every metric of the validation captions): they work as printed.
    with open(layout.report_md) as handle:
        notes = offered(handle.read())
    assert notes
    for command in notes:
        assert_works(command)
