"""Train SCORER + CBR.

    python train.py --cfg configs/dynamic/transformer_quick.yaml [--gpu ID] [--resume | --resume_from ITER]
                    [--overwrite] [--accept_config_changes] [KEY VALUE ...]

Outputs go to <exp_dir>/<exp_name>/ (utils/experiment.py): snapshots/, eval_sents/ (validation
captions of every snapshot), metrics.jsonl, train_log.txt, config.yaml, best_snapshot.json.
SIGTERM, SIGINT (Ctrl-C) and SIGHUP end the run after the current step, with a snapshot of it;
--resume then goes on exactly as if training had not stopped.
"""
import argparse
import contextlib
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from configs.defaults import load_config
from models.training import TrainingError, build, train_step
from utils import distributed
from utils.captioning import generate_captions, write_captions
from utils.checkpoint import (SNAPSHOT_KEYS, SnapshotError, capture_rng_state, config_differences, config_to_dict,
                              list_snapshots, load_snapshot, load_weights, restore_rng_state, save_snapshot,
                              snapshot_path)
from utils.cli import device_for, int_at_least, parse_with_overrides, report_errors
from utils.dataset import RCCDataset, batches_per_epoch, check_feature_shape, eval_loader, train_batches
from utils.device import describe, move_batch, select_device
from utils.eval_utils import java_executable, load_references, score_captions
from utils.experiment import Experiment, check_free_space, write_best
from utils.fileio import write_text_atomic
from utils.logger import Dashboard
from utils.utils import set_seed


class StopRequest:
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP set a flag; the loop ends the current step, saves, and stops.

    Signals that come while the snapshot is written are acknowledged and otherwise ignored.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.name = None

    def _handler(self, signum, frame):
        if self.name is None:
            self.name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            tqdm.write(f"{self.name}: stopping after this step (its snapshot is saved first)")
        else:
            tqdm.write(f"{signal.Signals(signum).name}: already stopping; the snapshot is being saved")

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self):
        """True on every rank once any rank got a signal (the ranks stop after the same step)."""
        return distributed.any_rank(self.name is not None)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config merged over configs/defaults.py")
    parser.add_argument("--gpu", type=int_at_least(-1), default=None, help="CUDA device id (-1: CPU); overrides gpu_id")
    parser.add_argument("--resume", action="store_true", help="continue from the newest snapshot")
    parser.add_argument("--resume_from", type=int_at_least(1), metavar="ITER", help="continue from the snapshot of ITER")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an experiment folder that holds snapshots (removes them and the logs)")
    parser.add_argument("--accept_config_changes", action="store_true",
                        help="resume although training keys differ from the snapshot's config")
    return parse_with_overrides(parser, argv)


def training_device(cfg):
    device = distributed.init_from_env(cfg.gpu_id)  # None unless started by torchrun with several processes
    device = device if device is not None else select_device(cfg.gpu_id)
    print(f"device: {describe(device)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def load_data(cfg, device):
    """(the training and validation data, cfg with the vocabulary's size), checked against the config."""
    train_set = RCCDataset(cfg, "train")
    val_set = RCCDataset(cfg, "val")
    cfg = cfg.clone()
    cfg.defrost()
    if len(train_set.vocab) != cfg.model.speaker.vocab_size:
        print(f"model.speaker.vocab_size is {cfg.model.speaker.vocab_size} in the config but "
              f"{cfg.data.vocab_json} has {len(train_set.vocab)} entries: using {len(train_set.vocab)}")
        cfg.model.speaker.vocab_size = len(train_set.vocab)
    cfg.freeze()
    check_feature_shape(cfg, train_set.feature_shape, cfg.data.feature_store or cfg.data.default_feature_dir)
    if cfg.data.train.batch_size > len(train_set):
        raise TrainingError(f"data.train.batch_size ({cfg.data.train.batch_size}) is larger than the "
                            f"{len(train_set)} ids of the train split; set it to at most {len(train_set)}")
    references = load_references(cfg.data.anno_json)
    java_executable()  # validation tokenizes with Java: fail now, not at the first snapshot
    return SimpleNamespace(train_set=train_set, val_set=val_set, val_loader=eval_loader(val_set, cfg, device),
                           references=references, per_epoch=batches_per_epoch(train_set, cfg)), cfg


def make_snapshot(state, cfg, vocab):
    return {
        "change_detector_state": state.model.change_detector.state_dict(),
        "speaker_state": state.model.speaker.state_dict(),
        "cbr_state": state.model.cbr.state_dict(),
        "optimizer_state": state.optimizer.state_dict(),
        "scheduler_state": state.scheduler.state_dict(),
        "scaler_state": state.scaler.state_dict(),  # {} unless train.amp is fp16
        "overflow_skips": state.overflow_skips,
        "iteration": state.iteration,
        "data_position": state.position,  # batches drawn so far (a skipped batch draws one too)
        "rng_state": capture_rng_state(),
        "config": config_to_dict(cfg),
        "vocab": dict(vocab),
    }


def restore(state, cfg, resume_from, accept_changes):
    """Loads the newest snapshot (or that of resume_from) into state, after checking it and the config."""
    iterations = list_snapshots(cfg)
    iteration = iterations[-1] if resume_from is None else resume_from
    if iteration not in iterations:
        raise TrainingError(f"--resume_from {iteration}: no such snapshot; the experiment has "
                            f"{', '.join(map(str, iterations))}")
    path = snapshot_path(cfg, iteration)
    try:
        snapshot = load_snapshot(path, required=SNAPSHOT_KEYS)
    except SnapshotError as err:
        if resume_from is not None:
            raise
        good = next((i for i in reversed(iterations[:-1]) if _loads(snapshot_path(cfg, i))), None)
        fix = (f"resume from the newest good one with --resume_from {good}, or delete {path}" if good is not None
               else "no earlier snapshot loads either: start over with --overwrite")
        raise SnapshotError(f"{err}; {fix}") from None
    differences = config_differences(snapshot["config"], cfg)
    if differences and not accept_changes:
        raise TrainingError(f"--resume: the config differs from the one {path} was trained with ("
                            + "; ".join(differences) + "); to continue with the new values add "
                            "--accept_config_changes, else resume with the config of the first run")
    load_weights(state.model.change_detector, snapshot["change_detector_state"], "change_detector_state", path)
    load_weights(state.model.speaker, snapshot["speaker_state"], "speaker_state", path)
    load_weights(state.model.cbr, snapshot["cbr_state"], "cbr_state", path)
    state.optimizer.load_state_dict(snapshot["optimizer_state"])
    state.scheduler.load_state_dict(snapshot["scheduler_state"])
    if snapshot.get("scaler_state"):  # snapshots of fp16 runs; older ones have none
        state.scaler.load_state_dict(snapshot["scaler_state"])
    state.overflow_skips = snapshot.get("overflow_skips", 0)
    restore_rng_state(snapshot["rng_state"])
    state.iteration = snapshot["iteration"]
    state.position = snapshot.get("data_position", state.iteration)  # snapshots older than the field
    print(f"resuming from {path} (iteration {state.iteration})")


def _loads(path):
    try:
        load_snapshot(path, required=SNAPSHOT_KEYS)
        return True
    except SnapshotError:
        return False


def for_training(model, cfg, device):
    """The module the loop calls: the model, wrapped for several processes or compiled as configured."""
    if distributed.world_size() > 1:
        distributed.check_batch_size(cfg.data.train.batch_size)
        # find_unused_parameters: only the last encoder block's logit scale enters the loss.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    return torch.compile(model) if cfg.train.compile else model


class Recorder:
    """What rank 0 writes: the logs, the dashboard, snapshots with their validation, best_snapshot.json."""

    def __init__(self, cfg, experiment, data, state, device):
        self.cfg, self.data, self.state, self.device = cfg, data, state, device
        self.layout = experiment.layout
        write_text_atomic(self.layout.config, cfg.dump())
        self.log = experiment.open_logs(state.iteration)
        validated = self.log.validated()
        self.best = max(validated.values(), key=lambda r: r["CIDEr"], default=None)
        write_best(self.layout, self.best and {**self.best, "snapshot": snapshot_path(cfg, self.best["iteration"])})
        self.dashboard = Dashboard(cfg.logger.visdom, cfg.logger.server, cfg.logger.port, env=cfg.exp_name)
        if self.dashboard.enabled:
            print(f"dashboard: {self.dashboard.url}")
        self.window = (time.time(), state.iteration)

    def progress(self, values):
        iteration = self.state.iteration
        speed = (iteration - self.window[1]) / max(time.time() - self.window[0], 1e-9)
        self.window = (time.time(), iteration)
        lr = self.state.optimizer.param_groups[0]["lr"]
        scales = {name: scale.item() for name, scale in self.state.model.logit_scales().items()}
        line = (f"iter {iteration}: total {values['total']:.4f} caption {values['caption']:.4f} "
                f"cross_view {values['cross_view']:.4f} cross_modal {values['cross_modal']:.4f} "
                f"lr {lr:.2e} {speed:.2f} it/s")
        fp16 = {}
        if self.state.scaler.is_enabled():
            fp16 = {"loss_scale": self.state.scaler.get_scale(), "overflow_skips": self.state.overflow_skips}
            line += f" loss scale {fp16['loss_scale']:g} ({fp16['overflow_skips']} steps skipped on fp16 overflow)"
        self.log.write({"iteration": iteration, "split": "train", **values, "lr": lr,
                        **{f"logit_scale_{name}": value for name, value in scales.items()}, "it_per_s": speed,
                        **fp16}, line)
        tqdm.write(line)
        self.dashboard.scalars(iteration, values, window="loss", title="losses")
        self.dashboard.scalars(iteration, scales, window="logit_scale", title="logit scales (log 1/tau)")
        self.dashboard.scalars(iteration, {"lr": lr}, window="lr", title="learning rate", log_y=True)
        self.dashboard.scalars(iteration, {"it/s": speed}, window="speed", title="iterations per second")

    def save(self):
        path = snapshot_path(self.cfg, self.state.iteration)
        save_snapshot(path, make_snapshot(self.state, self.cfg, self.data.train_set.vocab))
        return path

    def validate(self, iteration, stop):
        """Greedy validation captions of the model as it is (that of snapshot ``iteration``), scored and
        recorded; False when a stop request cut it short (the run validates it when it resumes)."""
        sc, nsc = generate_captions(self.state.model, self.data.val_loader, self.data.val_set.idx_to_word, self.device,
                                    beam_size=self.cfg.train.beam_size, amp=self.cfg.train.amp, should_stop=stop)
        if sc is None:
            return False
        write_captions(self.layout.val_captions_at(iteration), sc, nsc)
        found = score_captions(sc + nsc, self.data.references, metrics=("Bleu", "CIDEr"))
        scores = {"BLEU-4": found["Bleu_4"], "CIDEr": found["CIDEr"]}
        if self.best is None or scores["CIDEr"] > self.best["CIDEr"]:
            self.best = {"iteration": iteration, **scores}
            write_best(self.layout, {**self.best, "snapshot": snapshot_path(self.cfg, iteration)})
        line = (f"iter {iteration}: val BLEU-4 {scores['BLEU-4']:.4f} CIDEr {scores['CIDEr']:.4f} "
                f"(best CIDEr {self.best['CIDEr']:.4f} at {self.best['iteration']})")
        self.log.write({"iteration": iteration, "split": "val", **scores}, line)
        tqdm.write(line)
        self.dashboard.scalars(iteration, scores, window="val", title="validation")
        refs = self.data.references
        self.dashboard.captions(iteration, [(r["image_id"], r["caption"], refs.get(r["image_id"], []))
                                            for r in sc[:self.cfg.logger.num_val_captions]])
        return True

    def catch_up(self, stop):
        """After a resume: validates the resumed snapshot when its validation never finished."""
        iteration = self.state.iteration
        scheduled = iteration % self.cfg.train.snapshot_interval == 0 or iteration == self.cfg.train.max_iter
        if iteration > 0 and scheduled and iteration not in self.log.validated():
            tqdm.write(f"validating snapshot {iteration}, whose validation did not finish before the stop")
            self.validate(iteration, stop)

    def close(self):
        self.log.close()
        self.dashboard.close()


def due(iteration, interval, max_iter):
    return iteration % interval == 0 or iteration == max_iter


def do_train(cfg, resume=False, resume_from=None, overwrite=False, accept_changes=False):
    """The training loop. Returns the path of the last snapshot (None on ranks other than 0)."""
    device = training_device(cfg)
    set_seed(cfg.seed)
    main = distributed.is_main()
    resuming = resume or resume_from is not None
    data, cfg = load_data(cfg, device)
    with Experiment(cfg, resuming, overwrite) if main else contextlib.nullcontext() as experiment:
        state = build(cfg, device)
        if resuming:
            restore(state, cfg, resume_from, accept_changes)
        train_model = for_training(state.model, cfg, device)
        recorder = Recorder(cfg, experiment, data, state, device) if main else None
        if main:  # weights and two Adam moments: see the space before the hours of work
            check_free_space(experiment.root, 3 * sum(p.numel() * p.element_size() for p in state.model.parameters()))
        batches = train_batches(data.train_set, cfg, device, state.position)
        last = None
        with StopRequest() as stop, tqdm(total=cfg.train.max_iter, initial=state.iteration, desc="train",
                                          dynamic_ncols=True, disable=not main) as progress:
            stopping = lambda: stop.name is not None  # noqa: E731
            if main:
                recorder.catch_up(stopping)
            state.model.train()
            while state.iteration < cfg.train.max_iter and not stop.requested():
                values = train_step(state, train_model, move_batch(next(batches), device), cfg, device, data.per_epoch)
                if values is None:
                    continue
                progress.update(1)
                progress.set_postfix(cap=f"{values['caption']:.3f}", cv=f"{values['cross_view']:.3f}",
                                     cm=f"{values['cross_modal']:.3f}")
                if main and due(state.iteration, cfg.train.log_interval, cfg.train.max_iter):
                    recorder.progress(values)
                if due(state.iteration, cfg.train.snapshot_interval, cfg.train.max_iter):
                    if main:
                        last = recorder.save()
                        recorder.validate(state.iteration, stopping)
                        state.model.train()
                    distributed.barrier()  # the other ranks wait for rank 0's snapshot and validation
            if stop.name is not None:
                stop_with_snapshot(stop.name, state, recorder, cfg)
        if main:
            recorder.close()
            if recorder.best is not None:
                print(f"best validation CIDEr {recorder.best['CIDEr']:.4f} at iteration {recorder.best['iteration']}")
    return last


def stop_with_snapshot(name, state, recorder, cfg):
    """After a stop request: the state of the last completed step is in a snapshot; exit status 130."""
    path = snapshot_path(cfg, state.iteration)
    if recorder is not None and state.iteration > 0 and not os.path.exists(path):
        recorder.save()
    if recorder is not None:
        recorder.close()
        print(f"{name}: the state of iteration {state.iteration} is in {path}")
        print(f"{name}: stopped at iteration {state.iteration}; continue with "
              f"`python train.py --cfg <same config> --resume`")
    distributed.shutdown()
    sys.exit(130)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def run():
        try:
            cfg = load_config(args.cfg, args.opts, gpu_id=args.gpu)
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # torchrun's processes pick theirs
                device_for(cfg, "train.py", argv)
            do_train(cfg, args.resume, args.resume_from, args.overwrite, args.accept_config_changes)
        except NotImplementedError as err:
            raise TrainingError(f"the snippet {err} is not implemented yet (the `== To Implement ==` blocks of "
                                f"models/ and utils/utils.py); `make snippets` shows which pass") from None
        finally:
            distributed.shutdown()

    report_errors(run)


if __name__ == "__main__":
    main()
