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
import json
import os
import socket
import subprocess
import sys
import time

from configs.defaults import load_config
from utils.visdom_server import VisdomServerError, start_server, stop_server, wait_for_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "configs/dynamic/transformer_demo.yaml")
WORKDIR = ROOT  # data/demo and experiments/demo are relative to it (--workdir changes it)
DATA = "data/demo"
EXPERIMENT = "experiments/demo"
RENDER_SIZE = ("128", "96")  # width, height of the rendered images
# Random-weight ResNet-101 features (no ImageNet weights offline) keep shape only in the early
# stages: layer1 on a 112 x 112 input (28 x 28 grid), averaged down to 7 x 7 for CPU speed, plus 18
# channels of colour statistics per cell (--append_color), which random filters keep too weakly to
# tell a changed colour from a changed light.
FEATURE_ARGS = ("--image_height", "112", "--image_width", "112", "--model_stage", "1", "--output_grid", "7",
                "--append_color")
IMAGE_FOLDERS = (("images", "features"), ("sc_images", "sc_features"), ("nsc_images", "nsc_features"))

# Quality the demo must reach on the synthetic test split.
TARGETS = {"CIDEr": 60.0, "no_change_rate": 0.90, "right_type_rate": 0.70}


def run(command, stage):
    print(f"  $ {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=WORKDIR)
    if result.returncode:
        sys.exit(f"demo: stage '{stage}' failed (exit {result.returncode}); see the output above")


def python(script, *args):
    """A project script (by its absolute path: the demo may run in another working folder)."""
    return [sys.executable, script if script == "-m" else os.path.join(ROOT, script), *args]


def imagenet_weights_present():
    """True when torchvision's ResNet-101 ImageNet checkpoint is already in the torch hub cache."""
    import torch
    from torchvision.models import ResNet101_Weights

    file_name = os.path.basename(ResNet101_Weights.IMAGENET1K_V1.url)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", file_name))


def port_open(port):
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_visdom(port):
    """A visdom server on 127.0.0.1 that this demo owns, or None when one already answers there."""
    if port_open(port):
        print(f"  a server already answers on port {port}: using it")
        return None
    run(python("scripts/setup_visdom_offline.py"), "visdom set-up")
    log = open(os.path.join(WORKDIR, EXPERIMENT, "visdom_server.log"), "w")
    server = start_server(port, os.path.join(WORKDIR, EXPERIMENT, "visdom_env"), log)
    try:
        wait_for_index(port, server)
        print(f"  dashboard: http://127.0.0.1:{port}/env/demo (open it to watch training)")
    except VisdomServerError as err:
        print(f"  {err}; training goes on without the dashboard (see {log.name})")
    return server


def check_feature_settings(data, settings):
    """Features on disk must come from this demo's extraction settings (an older checkout used others).

    The settings are stamped next to the data before the first feature is written, so an interrupted
    extraction resumes; features without a matching stamp stop the demo with what to do.
    """
    stamp = os.path.join(data, "feature_settings.json")
    found = None
    if os.path.exists(stamp):
        with open(stamp) as handle:
            found = json.load(handle)
    elif not any(os.path.isdir(os.path.join(data, f)) and os.listdir(os.path.join(data, f))
                 for _, f in IMAGE_FOLDERS):
        with open(stamp, "w") as handle:
            json.dump(settings, handle, indent=1)
        return
    if found != settings:
        sys.exit(f"demo: the features under {data} were made with other settings ({found or 'unknown'}; this "
                 f"demo uses {settings}).\nRun `make clean-demo` (it removes data/demo and experiments/demo) "
                 f"and `make demo` again.")


def best_iteration():
    with open(os.path.join(WORKDIR, EXPERIMENT, "best_snapshot.json")) as handle:
        return json.load(handle)["iteration"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_scenes", type=int, default=2000, help="synthetic scenes to generate")
    parser.add_argument("--max_iter", type=int, default=None, help="override the demo config's iterations")
    parser.add_argument("--port", type=int, default=8097, help="visdom port")
    parser.add_argument("--no_visdom", action="store_true", help="train without the dashboard")
    parser.add_argument("--workdir", default=ROOT, help="folder that receives data/demo and experiments/demo")
    args = parser.parse_args()
    global WORKDIR
    WORKDIR = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(WORKDIR, EXPERIMENT), exist_ok=True)
    timings = []

    def stage(name, done, action):
        print(f"\n== {name}", flush=True)
        start = time.time()
        if done():
            print("  already there: skipped")
        else:
            action()
        timings.append((name, time.time() - start))

    data = os.path.join(WORKDIR, DATA)
    stage("1. generate synthetic CLEVR-Change", lambda: os.path.exists(os.path.join(data, "scenes.json")),
          lambda: run(python("scripts/generate_synthetic_clevr.py", "--output_dir", DATA, "--num_scenes",
                             str(args.num_scenes), "--width", RENDER_SIZE[0], "--height", RENDER_SIZE[1]),
                      "generate"))

    weights = "imagenet" if imagenet_weights_present() else "random"
    print(f"\nfeatures use {weights} ResNet-101 weights"
          + ("" if weights == "imagenet" else " (no ImageNet checkpoint in the torch hub cache)"))
    check_feature_settings(data, {"extract_features": list(FEATURE_ARGS), "weights": weights})
    for images, features in IMAGE_FOLDERS:
        stage(f"2. extract features {images} -> {features}",
              lambda: os.path.isdir(os.path.join(data, features)) and len(os.listdir(os.path.join(data, features)))
              >= len(os.listdir(os.path.join(data, images))),
              lambda: run(python("scripts/extract_features.py", "--input_image_dir", f"{DATA}/{images}",
                                 "--output_dir", f"{DATA}/{features}", "--batch_size", "50",
                                 *FEATURE_ARGS, "--weights", weights), "extract"))

    stage("3. preprocess captions", lambda: os.path.exists(os.path.join(data, "transformer_labels.h5")),
          lambda: run(python("scripts/preprocess_captions_transformer.py",
                             "--input_captions_json", f"{DATA}/change_captions.json",
                             "--input_neg_captions_json", f"{DATA}/no_change_captions.json",
                             "--input_image_dir", f"{DATA}/images", "--split_json", f"{DATA}/splits.json",
                             "--output_vocab_json", f"{DATA}/transformer_vocab.json",
                             "--output_h5", f"{DATA}/transformer_labels.h5"), "preprocess"))

    overrides = [] if args.max_iter is None else ["train.max_iter", str(args.max_iter)]
    overrides += ["logger.visdom", str(not args.no_visdom), "logger.port", str(args.port)]

    snapshots = os.path.join(WORKDIR, EXPERIMENT, "snapshots")
    final_iteration = args.max_iter or load_config(CONFIG).train.max_iter
    final_snapshot = os.path.join(snapshots, f"demo_checkpoint_{final_iteration}.pt")

    def train_with_dashboard():
        # An interrupted demo continues from its newest snapshot.
        resume = ["--resume"] if os.path.isdir(snapshots) and any(
            name.endswith(".pt") for name in os.listdir(snapshots)) else []
        server = None if args.no_visdom else start_visdom(args.port)
        try:
            run(python("train.py", "--cfg", CONFIG, *resume, *overrides), "train")
        finally:
            if server is not None:
                stop_server(server)
                print("  visdom server stopped")

    stage("4-5. start the visdom server and train", lambda: os.path.exists(final_snapshot),
          train_with_dashboard)

    iteration = best_iteration()
    test_dir = os.path.join(WORKDIR, EXPERIMENT, "test_output", "captions")
    stage(f"6. caption the test split with snapshot {iteration}",
          lambda: os.path.exists(os.path.join(test_dir, "test", "sc_results.json")),
          lambda: run(python("test.py", "--cfg", CONFIG, "--snapshot", str(iteration)), "test"))

    anno, types = f"{DATA}/total_change_captions_reformat.json", f"{DATA}/type_mapping.json"
    stage("7. evaluate validation captions",
          lambda: os.path.exists(os.path.join(WORKDIR, EXPERIMENT, "eval_sents", "eval_results.json")),
          lambda: run(python("evaluate.py", "--results_dir", f"{EXPERIMENT}/eval_sents", "--anno", anno,
                             "--type_file", types), "evaluate val"))
    stage("7. evaluate test captions", lambda: os.path.exists(os.path.join(test_dir, "eval_results.json")),
          lambda: run(python("evaluate.py", "--results_dir", f"{EXPERIMENT}/test_output/captions", "--anno",
                             anno, "--type_file", types), "evaluate test"))

    stage("8. triplet figures and hand-in report",
          lambda: os.path.exists(os.path.join(WORKDIR, EXPERIMENT, "report", "report.html")),
          lambda: run(python("scripts/make_report.py", "--cfg", CONFIG), "report"))

    print("\n== time per stage")
    for name, seconds in timings:
        print(f"  {seconds:7.1f} s  {name}")
    print(f"  {sum(s for _, s in timings):7.1f} s  in all (the install, if any, came before)")
    report_scores(os.path.join(test_dir, "eval_results.json"))


def report_scores(path):
    with open(path) as handle:
        test = json.load(handle)["folders"]["test"]
    figures = {"CIDEr": 100 * test["scores"]["total"]["CIDEr"],
               "no_change_rate": test["change_detection"]["distractor_no_change"],
               "right_type_rate": test["change_detection"]["change_type_correct"]}
    print("\n== test split scores")
    for name, value in figures.items():
        verdict = "meets" if value >= TARGETS[name] else "BELOW"
        print(f"  {name:16s} {value:8.3f}   ({verdict} the target {TARGETS[name]})")


if __name__ == "__main__":
    main()
