"""The embedded demo: the whole pipeline on a synthetic CLEVR-Change set, on the CPU, in minutes.

Stages (each skipped when its output is already there, so a second run is quick):
  1. generate the synthetic data set            -> data/demo/
  2. extract ResNet-101 features (3 folders)    -> data/demo/{features,sc_features,nsc_features}/
  3. build the vocabulary and label file        -> data/demo/transformer_{vocab.json,labels.h5}
  4. start a visdom server (offline-capable)    -> http://127.0.0.1:8097/env/demo (stopped after training)
  5. train configs/dynamic/transformer_demo.yaml -> experiments/demo/
  6. caption the test split with the best snapshot (test.py)
  7. evaluate validation and test captions (evaluate.py)
  8. draw triplet figures and write the hand-in report -> experiments/demo/report/
Run it with `make demo` (DEMO_SCENES=N scales it) or `python scripts/demo.py --num_scenes N`.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from configs.defaults import load_config
from utils import synthetic_data
from utils.assignment import missing_snippets
from utils.cli import int_at_least
from utils.errors import UserError
from utils.fileio import read_json
from utils.layout import CAPTION_FILES, ExperimentLayout
from utils.visdom_server import VisdomServerError, start_server, stop_server, wait_for_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "configs/dynamic/transformer_demo.yaml")
DATA = "data/demo"  # relative to the working folder, as the demo config's data paths are

# Quality the demo must reach on the synthetic test split.
TARGETS = {"CIDEr": 60.0, "no_change_rate": 0.90, "right_type_rate": 0.70}


STOPPED = ("demo: stopped by Ctrl-C during stage '{stage}'. Run `make demo` again to go on: finished stages are "
           "skipped and training resumes from its last snapshot")


def run(command, stage, cwd=ROOT):
    print(f"  $ {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, cwd=cwd)
    while True:
        try:
            returncode = process.wait()
            break
        except KeyboardInterrupt:  # the stage got the Ctrl-C too: let it finish (train.py saves a snapshot)
            continue
    if returncode in (130, -signal.SIGINT):
        print(STOPPED.format(stage=stage), file=sys.stderr)
        sys.exit(130)
    if returncode:
        sys.exit(f"demo: stage '{stage}' failed (exit {returncode}); see the output above")


def python(script, *args):
    """A project script (by its absolute path: the demo may run in another working folder)."""
    return [sys.executable, script if script == "-m" else os.path.join(ROOT, script), *args]


def port_open(port):
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_visdom(port, folder):
    """A visdom server on 127.0.0.1 that this demo owns (its log and state in ``folder``), or None when one
    already answers there."""
    if port_open(port):
        print(f"  a server already answers on port {port}: using it")
        return None
    run(python("scripts/setup_visdom_offline.py"), "visdom set-up")
    log = open(os.path.join(folder, "visdom_server.log"), "w")
    server = start_server(port, os.path.join(folder, "visdom_env"), log)
    try:
        wait_for_index(port, server)
        print(f"  dashboard: http://127.0.0.1:{port}/env/demo (open it to watch training)")
    except VisdomServerError as err:
        print(f"  {err}; training goes on without the dashboard (see {log.name})")
    return server


class Demo:
    """The stages in a working folder; each is skipped when its output is there, and timed."""

    def __init__(self, args):
        self.args = args
        self.workdir = os.path.abspath(args.workdir)
        cfg = load_config(CONFIG)
        self.layout = ExperimentLayout(os.path.join(self.workdir, cfg.exp_dir, cfg.exp_name), cfg.exp_name)
        self.final_iteration = args.max_iter or cfg.train.max_iter
        self.timings = []

    def run(self, command, stage):
        run(command, stage, cwd=self.workdir)

    def stage(self, name, done, action):
        print(f"\n== {name}", flush=True)
        start = time.time()
        if done():
            print("  already there: skipped")
        else:
            action()
        self.timings.append((name, time.time() - start))

    def prepare_data(self):
        data = os.path.join(self.workdir, DATA)
        self.stage("1. generate synthetic CLEVR-Change", lambda: synthetic_data.generated(data),
                   lambda: self.run(synthetic_data.generate_command(DATA, self.args.num_scenes), "generate"))
        try:
            synthetic_data.check_feature_settings(
                data, "make clean-demo` (it removes data/demo and experiments/demo) and `make demo")
        except UserError as err:
            sys.exit(f"demo: {err}")
        for images, features in synthetic_data.IMAGE_FOLDERS:
            self.stage(f"2. extract features {images} -> {features}",
                       lambda: synthetic_data.extracted(data, images, features),
                       lambda: self.run(synthetic_data.extract_command(DATA, images, features), "extract"))
        self.stage("3. preprocess captions", lambda: synthetic_data.preprocessed(data),
                   lambda: self.run(synthetic_data.preprocess_command(DATA), "preprocess"))

    def train(self):
        args = self.args
        overrides = [] if args.max_iter is None else ["train.max_iter", str(args.max_iter)]
        overrides += ["logger.visdom", str(not args.no_visdom), "logger.port", str(args.port)]

        def train_with_dashboard():
            resume = ["--resume"] if self.layout.snapshot_iterations() else []  # an interrupted demo goes on
            server = None if args.no_visdom else start_visdom(args.port, self.layout.root)
            try:
                self.run(python("train.py", "--cfg", CONFIG, *resume, *overrides), "train")
            finally:
                if server is not None:
                    stop_server(server)
                    print("  visdom server stopped")

        self.stage("4-5. start the visdom server and train",
                   lambda: os.path.exists(self.layout.snapshot(self.final_iteration)), train_with_dashboard)

    def test_and_report(self):
        layout = self.layout
        iteration = read_json(layout.best, "the best snapshot's file")["iteration"]
        self.stage(f"6. caption the test split with snapshot {iteration}",
                   lambda: os.path.exists(os.path.join(layout.test_captions_of("test"), CAPTION_FILES[0])),
                   lambda: self.run(python("test.py", "--cfg", CONFIG, "--snapshot", "best"), "test"))
        anno, types = f"{DATA}/total_change_captions_reformat.json", f"{DATA}/type_mapping.json"
        for name, results, scores in (("validation", layout.val_captions, layout.val_scores),
                                      ("test", layout.test_captions, layout.test_scores)):
            self.stage(f"7. evaluate {name} captions", lambda: os.path.exists(scores),
                       lambda: self.run(python("evaluate.py", "--results_dir", os.path.relpath(results, self.workdir),
                                               "--anno", anno, "--type_file", types), f"evaluate {name}"))
        self.stage("8. triplet figures and hand-in report", lambda: os.path.exists(layout.report_html),
                   lambda: self.run(python("scripts/make_report.py", "--cfg", CONFIG), "report"))

    def print_timings(self):
        print("\n== time per stage")
        for name, seconds in self.timings:
            print(f"  {seconds:7.1f} s  {name}")
        print(f"  {sum(s for _, s in self.timings):7.1f} s  in all (the install, if any, came before)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_scenes", type=int_at_least(10), default=2000, help="synthetic scenes to generate")
    parser.add_argument("--max_iter", type=int_at_least(1), default=None, help="override the demo config's iterations")
    parser.add_argument("--port", type=int_at_least(1, 65535), default=8097, help="visdom port")
    parser.add_argument("--no_visdom", action="store_true", help="train without the dashboard")
    parser.add_argument("--workdir", default=ROOT, help="folder that receives data/demo and experiments/demo")
    args = parser.parse_args()
    missing = missing_snippets()
    if missing:
        sys.exit(f"demo: {len(missing)} of the assignment's snippets are not implemented yet: "
                 + ", ".join(f"{name} ({path})" for name, path in missing)
                 + ".\nWrite them in their `== To Implement ==` blocks, check them with `make snippets`, "
                   "then run `make demo` again.")
    demo = Demo(args)
    os.makedirs(demo.layout.root, exist_ok=True)
    demo.prepare_data()
    demo.train()
    demo.test_and_report()
    demo.print_timings()
    report_scores(demo.layout.test_scores)


def report_scores(path):
    test = read_json(path, "the test scores")["folders"]["test"]
    figures = {"CIDEr": 100 * test["scores"]["total"]["CIDEr"],
               "no_change_rate": test["change_detection"]["distractor_no_change"],
               "right_type_rate": test["change_detection"]["change_type_correct"]}
    print("\n== test split scores")
    for name, value in figures.items():
        verdict = "meets" if value >= TARGETS[name] else "BELOW"
        print(f"  {name:17s} {value:8.3f}   ({verdict} the target {TARGETS[name]})")
    objects = (test.get("object_score") or {}).get("figures")
    if objects and objects["object_color_shape"] is not None:
        print(f"  {'right_object_rate':17s} {objects['object_color_shape']:8.3f}   (no target: the changed pairs whose "
              f"caption's subject has the changed object's colour and shape, as far as it names them; all named "
              f"attributes right {objects['object_named']:.3f}; docs/data.md says why this demo names shapes and "
              f"materials at chance)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # between stages
        print("demo: stopped by Ctrl-C. Run `make demo` again to go on: finished stages are skipped",
              file=sys.stderr)
        sys.exit(130)
