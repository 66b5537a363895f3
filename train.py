"""Train SCORER + CBR: python train.py --cfg configs/dynamic/transformer_quick.yaml [KEY VALUE ...]"""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs.defaults import ConfigError, load_config
from utils.checkpoint import (SNAPSHOT_KEYS, SnapshotError, capture_rng_state, config_to_dict,
                              list_snapshots, load_snapshot, load_weights, restore_rng_state,
                              save_snapshot, snapshot_path)
from utils import distributed
from utils.dataset import DataError, RCCDataset
from utils.distributed import DistributedError
from models.captioner import CaptionModel, generate_captions
from utils.device import autocast_context, move_batch, select_device
from utils.eval_utils import java_executable, load_references, score_captions
from utils.fileio import write_json_atomic
from utils.logger import Dashboard
from utils.utils import set_seed


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class Stop(Exception):
    """SIGTERM or Ctrl-C: save a snapshot and leave."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cfg", required=True, help="YAML config merged over configs/defaults.py")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device id (-1: CPU); overrides gpu_id")
    parser.add_argument("--resume", action="store_true", help="continue from the newest snapshot")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, e.g. train.max_iter 100")
    return parser.parse_args(argv)


def prepare_config(cfg, train_set):
    """Fits the model keys the data decides (vocabulary size) and checks the rest against the features."""
    cfg = cfg.clone()
    cfg.defrost()
    vocab_size = len(train_set.vocab)
    if vocab_size != cfg.model.speaker.vocab_size:
        print(f"model.speaker.vocab_size is {cfg.model.speaker.vocab_size} in the config but "
              f"{cfg.data.vocab_json} has {vocab_size} entries: using {vocab_size}")
        cfg.model.speaker.vocab_size = vocab_size
    channels, height, width = train_set.feature_shape
    if channels + 2 != cfg.model.change_detector.feat_dim:
        raise TrainingError(f"features in {cfg.data.default_feature_dir} have {channels} channels, so "
                            f"model.change_detector.feat_dim must be {channels + 2} (channels + 2 "
                            f"coordinates), not {cfg.model.change_detector.feat_dim}")
    if max(height, width) > cfg.model.change_detector.grid:
        raise TrainingError(f"features in {cfg.data.default_feature_dir} have a {height}x{width} grid; "
                            f"set model.change_detector.grid to at least {max(height, width)}")
    cfg.freeze()
    return cfg


def make_loader(dataset, cfg, device, batch_sampler=None, batch_size=1):
    """batch_sampler for training, or batch_size for the ordered val/test loaders."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    # A private generator keeps the loader from drawing on the global RNG (exact resume).
    return DataLoader(dataset, **batching, num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def epoch_batches(num_items, batch_size, seed, epoch):
    """The shuffled batches of one epoch, a function of (seed, epoch) alone; the last partial batch is dropped."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    batch_size = min(batch_size, num_items)
    return [order[i:i + batch_size] for i in range(0, num_items - batch_size + 1, batch_size)]


def train_batches(dataset, cfg, device, start_iteration):
    """Endless stream of training batches that resumes mid-epoch exactly where an earlier run stopped."""
    per_epoch = len(epoch_batches(len(dataset), cfg.data.train.batch_size, cfg.seed, 0))
    epoch, offset = divmod(start_iteration, per_epoch)
    while True:
        dataset.set_epoch(epoch)
        # With several processes each rank loads its slice of the same global batches.
        batches = [distributed.local_slice(batch) for batch in
                   epoch_batches(len(dataset), cfg.data.train.batch_size, cfg.seed, epoch)[offset:]]
        yield from make_loader(dataset, cfg, device, batch_sampler=batches)
        epoch, offset = epoch + 1, 0


def logit_scales(model):
    return {"encoder": model.change_detector.scorer[-1].attention.logit_scale.item(),
            "cbr": model.cbr.contra.logit_scale.item()}


def clamp_logit_scales(model, maximum):
    with torch.no_grad():
        model.change_detector.scorer[-1].attention.logit_scale.clamp_(max=maximum)
        model.cbr.contra.logit_scale.clamp_(max=maximum)


def make_snapshot(model, optimizer, scheduler, iteration, cfg, vocab):
    return {
        "change_detector_state": model.change_detector.state_dict(),
        "speaker_state": model.speaker.state_dict(),
        "cbr_state": model.cbr.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "iteration": iteration,
        "rng_state": capture_rng_state(),
        "config": config_to_dict(cfg),
        "vocab": dict(vocab),
    }


def validate(model, val_loader, val_set, references, cfg, device, iteration, exp_root):
    """Greedy captions for the validation split, written as COCO results, and their BLEU-4 and CIDEr."""
    sc_results, nsc_results = generate_captions(model, val_loader, val_set.idx_to_word, device,
                                                beam_size=cfg.train.beam_size, amp=cfg.train.amp)
    out_dir = os.path.join(exp_root, "eval_sents", f"{cfg.exp_name}_sents_{iteration}")
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "sc_results.json"), sc_results)
    write_json_atomic(os.path.join(out_dir, "nsc_results.json"), nsc_results)
    scores = score_captions(sc_results + nsc_results, references, metrics=("Bleu", "CIDEr"))
    return {"BLEU-4": scores["Bleu_4"], "CIDEr": scores["CIDEr"]}, sc_results, nsc_results


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise TrainingError(f"cannot write to the experiment folder {folder} ({err.strerror}); "
                            f"set exp_dir to a writable folder") from None


def do_train(cfg, resume=False):
    """The training loop. Returns the path of the last snapshot (None on ranks other than 0)."""
    device = distributed.init_from_env(cfg.gpu_id)  # None unless started by torchrun with several processes
    device = device if device is not None else select_device(cfg.gpu_id)
    main = distributed.is_main()
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    exp_root = os.path.join(cfg.exp_dir, cfg.exp_name)
    check_writable(exp_root)

    train_set = RCCDataset(cfg, "train")
    val_set = RCCDataset(cfg, "val")
    cfg = prepare_config(cfg, train_set)
    references = load_references(cfg.data.anno_json)
    java_executable()  # validation tokenizes with Java: fail now, not at the first snapshot
    if main:
        with open(os.path.join(exp_root, "config.yaml"), "w") as handle:
            handle.write(cfg.dump())

    model = CaptionModel(cfg, recompute=cfg.train.recompute_attention).to(device)
    optim = cfg.train.optim
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                 eps=optim.eps, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)

    start_iteration = 0
    if resume:
        done = list_snapshots(cfg)
        if not done:
            raise TrainingError(f"--resume: no snapshot in {os.path.join(exp_root, 'snapshots')}; "
                                f"start without --resume")
        path = snapshot_path(cfg, done[-1])
        snapshot = load_snapshot(path, required=SNAPSHOT_KEYS)
        load_weights(model.change_detector, snapshot["change_detector_state"], "change_detector_state", path)
        load_weights(model.speaker, snapshot["speaker_state"], "speaker_state", path)
        load_weights(model.cbr, snapshot["cbr_state"], "cbr_state", path)
        optimizer.load_state_dict(snapshot["optimizer_state"])
        scheduler.load_state_dict(snapshot["scheduler_state"])
        restore_rng_state(snapshot["rng_state"])
        start_iteration = snapshot["iteration"]
        print(f"resuming from {path} (iteration {start_iteration})")
    train_model = model  # what the loop calls; snapshots, logit scales and validation use model
    if distributed.world_size() > 1:
        distributed.check_batch_size(cfg.data.train.batch_size)
        # find_unused_parameters: only the last encoder block's logit scale enters the loss.
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=True)
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    per_epoch = len(epoch_batches(len(train_set), cfg.data.train.batch_size, cfg.seed, 0))
    val_loader = make_loader(val_set, cfg, device, batch_size=cfg.data.val.batch_size)
    dashboard = Dashboard(cfg.logger.visdom and main, cfg.logger.server, cfg.logger.port, env=cfg.exp_name)
    if dashboard.enabled:
        print(f"dashboard: {dashboard.url}")
    log_file = open(os.path.join(exp_root, "train_log.txt") if main else os.devnull, "a")
    metrics_file = open(os.path.join(exp_root, "metrics.jsonl") if main else os.devnull, "a")
    best_path = os.path.join(exp_root, "best_snapshot.json")
    best = json.load(open(best_path)) if os.path.exists(best_path) else None

    def log(record, line):
        if not main:
            return
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        log_file.write(line + "\n")
        log_file.flush()
        tqdm.write(line)

    def on_signal(signum, frame):
        raise Stop(signal.Signals(signum).name)

    previous_handler = signal.signal(signal.SIGTERM, on_signal)
    iteration = start_iteration
    skipped_in_a_row = 0  # consecutive batches dropped by train.on_nonfinite_loss skip
    last_snapshot = None
    model.train()
    progress = tqdm(total=cfg.train.max_iter, initial=start_iteration, desc="train", dynamic_ncols=True,
                    disable=not main)
    window_start, window_iterations = time.time(), 0
    try:
        batches = train_batches(train_set, cfg, device, start_iteration)
        while iteration < cfg.train.max_iter:
            batch = move_batch(next(batches), device)
            if distributed.world_size() > 1:
                # Dropout masks depend on (seed, iteration, rank) alone: ranks differ, a resumed run repeats.
                torch.manual_seed((cfg.seed * 1_000_003 + iteration) * 1009 + distributed.rank())
            with autocast_context(device, cfg.train.amp):
                losses = train_model(batch, cfg.train.lambda_v, cfg.train.lambda_m)
            values = distributed.average_over_ranks(losses)  # the global batch's losses, on every rank
            if not math.isfinite(values["total"]):
                parts = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                message = (f"non-finite loss at iteration {iteration + 1} ({parts})")
                if cfg.train.on_nonfinite_loss == "skip":
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= per_epoch:  # every batch fails: skipping would never end
                        raise TrainingError(f"{message}: {skipped_in_a_row} batches in a row (an epoch) "
                                            f"had a non-finite loss; check the features for NaN/Inf "
                                            f"and lower train.optim.lr")
                    tqdm.write(message + "; batch skipped")
                    optimizer.zero_grad(set_to_none=True)
                    continue
                raise TrainingError(message + "; the last good snapshot is kept. Lower train.optim.lr, "
                                    "set train.grad_clip, or set train.on_nonfinite_loss skip")
            skipped_in_a_row = 0
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            clamp_logit_scales(model, cfg.train.max_logit_scale)
            iteration += 1
            if iteration % per_epoch == 0:
                scheduler.step()
            window_iterations += 1
            progress.update(1)
            progress.set_postfix(cap=f"{values['caption']:.3f}", cv=f"{values['cross_view']:.3f}",
                                 cm=f"{values['cross_modal']:.3f}")

            if iteration % cfg.train.log_interval == 0 or iteration == cfg.train.max_iter:
                speed = window_iterations / max(time.time() - window_start, 1e-9)
                window_start, window_iterations = time.time(), 0
                lr = optimizer.param_groups[0]["lr"]
                scales = logit_scales(model)
                log({"iteration": iteration, "split": "train", **values, "lr": lr,
                     "logit_scale_encoder": scales["encoder"], "logit_scale_cbr": scales["cbr"],
                     "it_per_s": speed},
                    f"iter {iteration}: total {values['total']:.4f} caption {values['caption']:.4f} "
                    f"cross_view {values['cross_view']:.4f} cross_modal {values['cross_modal']:.4f} "
                    f"lr {lr:.2e} {speed:.2f} it/s")
                dashboard.scalars(iteration, values, window="loss", title="losses")
                dashboard.scalars(iteration, scales, window="logit_scale", title="logit scales (log 1/tau)")
                dashboard.scalars(iteration, {"lr": lr}, window="lr", title="learning rate", log_y=True)
                dashboard.scalars(iteration, {"it/s": speed}, window="speed", title="iterations per second")

            snapshot_due = iteration % cfg.train.snapshot_interval == 0 or iteration == cfg.train.max_iter
            if snapshot_due and not main:
                distributed.barrier()  # rank 0 saves and validates meanwhile
            if snapshot_due and main:
                last_snapshot = snapshot_path(cfg, iteration)
                save_snapshot(last_snapshot, make_snapshot(model, optimizer, scheduler, iteration, cfg,
                                                           train_set.vocab))
                scores, sc_results, _ = validate(model, val_loader, val_set, references, cfg, device,
                                                 iteration, exp_root)
                if best is None or scores["CIDEr"] > best["CIDEr"]:
                    best = {"iteration": iteration, **scores, "snapshot": last_snapshot}
                    write_json_atomic(best_path, best)
                log({"iteration": iteration, "split": "val", **scores},
                    f"iter {iteration}: val BLEU-4 {scores['BLEU-4']:.4f} CIDEr {scores['CIDEr']:.4f} "
                    f"(best CIDEr {best['CIDEr']:.4f} at {best['iteration']}); snapshot {last_snapshot}")
                dashboard.scalars(iteration, scores, window="val", title="validation")
                shown = sc_results[:cfg.logger.num_val_captions]
                dashboard.captions(iteration, [(r["image_id"], r["caption"], references.get(r["image_id"], []))
                                               for r in shown])
                distributed.barrier()
                window_start, window_iterations = time.time(), 0
    except (Stop, KeyboardInterrupt) as reason:
        progress.close()
        name = reason.args[0] if isinstance(reason, Stop) else "Ctrl-C"
        if iteration > start_iteration and main:
            last_snapshot = snapshot_path(cfg, iteration)
            save_snapshot(last_snapshot, make_snapshot(model, optimizer, scheduler, iteration, cfg,
                                                       train_set.vocab))
            print(f"{name}: saved {last_snapshot}")
        print(f"{name}: stopped at iteration {iteration}; continue with "
              f"`python train.py --cfg <same config> --resume`")
        sys.exit(130)
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous_handler)
        log_file.close()
        metrics_file.close()
        dashboard.close()
    if best is not None:
        print(f"best validation CIDEr {best['CIDEr']:.4f} at iteration {best['iteration']} ({best['snapshot']})")
    return last_snapshot


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.cfg, args.opts, gpu_id=args.gpu)
        do_train(cfg, resume=args.resume)
    except (ConfigError, DataError, SnapshotError, TrainingError, DistributedError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
