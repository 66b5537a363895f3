"""The training state and one optimiser step, as train.py runs them; the benchmark (research/benchmark.py)
and the grader's smoke run (grading/child.py) run the same step."""
import math
from types import SimpleNamespace

import torch
from tqdm import tqdm

from models.captioner import CaptionModel
from utils import distributed
from utils.device import autocast_context
from utils.errors import UserError


class TrainingError(UserError):
    """Training cannot go on; the message says why and what to do."""


def build(cfg, device, model=None):
    """The model (by default the one cfg describes), its optimiser, schedule and gradient scaler, at
    iteration 0."""
    if model is None:
        model = CaptionModel(cfg, recompute=cfg.train.recompute_attention)
    model = model.to(device)
    optim = cfg.train.optim
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                 eps=optim.eps, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)
    # fp16 gradients underflow without loss scaling. Scaling by a power of two and unscaling before the
    # step is exact in float32, so on the CPU (no autocast) an fp16 run computes what a float32 run does.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                           iteration=0, position=0, skipped_in_a_row=0, overflow_skips=0)


def train_step(state, train_model, batch, cfg, device, per_epoch):
    """One optimiser step on batch; returns the losses, or None when a non-finite loss was skipped."""
    if distributed.world_size() > 1:
        # Dropout masks depend on (seed, iteration, rank) alone: ranks differ, a resumed run repeats.
        torch.manual_seed((cfg.seed * 1_000_003 + state.iteration) * 1009 + distributed.rank())
    with autocast_context(device, cfg.train.amp):
        losses = train_model(batch, cfg.train.lambda_v, cfg.train.lambda_m)
    values = distributed.average_over_ranks(losses)  # the global batch's losses, on every rank
    state.position += 1
    state.optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(values["total"]):
        message = (f"non-finite loss at iteration {state.iteration + 1} ("
                   + ", ".join(f"{k} {v:.4g}" for k, v in values.items()) + ")")
        if cfg.train.on_nonfinite_loss == "stop":
            raise TrainingError(message + "; the last good snapshot is kept. Lower train.optim.lr, set "
                                "train.grad_clip, or set train.on_nonfinite_loss skip (the loader checks "
                                "every feature file it reads for NaN/Inf, so the data are finite)")
        state.skipped_in_a_row += 1
        if state.skipped_in_a_row >= per_epoch:  # every batch fails: skipping would never end
            raise TrainingError(f"{message}: {state.skipped_in_a_row} batches in a row (an epoch) had a "
                                f"non-finite loss; the weights are broken: lower train.optim.lr and resume "
                                f"from an earlier snapshot")
        tqdm.write(message + "; batch skipped")
        return None
    state.skipped_in_a_row = 0
    state.scaler.scale(losses["total"]).backward()
    state.scaler.unscale_(state.optimizer)  # the true gradients, before clipping (a no-op unless fp16)
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.train.grad_clip)
    scale = state.scaler.get_scale()
    state.scaler.step(state.optimizer)  # skipped when a gradient overflowed in fp16
    state.scaler.update()
    if state.scaler.get_scale() < scale:  # the scaler backs off after an overflow, and only then
        state.overflow_skips += 1
    with torch.no_grad():  # the logit scales of the losses' temperatures: 1/tau at most exp(max_logit_scale)
        for scale in state.model.logit_scales().values():
            scale.clamp_(max=cfg.train.max_logit_scale)
    state.iteration += 1
    if state.iteration % per_epoch == 0:
        state.scheduler.step()
    return values
