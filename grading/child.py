"""What runs inside a sandboxed child (grading.sandbox), on the submission's files: one snippet on the
answer-free cases it is given, the smoke run from the recorded initial weights on the batch it is
given, or the sandbox probe. It only computes and saves tensors and numbers (outputs.pt in its
scratch folder, read by the grader with weights_only); nothing here knows an expected value or
decides a score.
"""
import importlib
import math
import os
import socket
import sys

import torch

from configs.defaults import load_config
from grading import snippet_cases_module

snippet_cases = snippet_cases_module()
OUTPUTS = "outputs.pt"  # in the child's working (scratch) folder

# Tiny dimensions of the smoke run's model (KEY VALUE pairs on top of configs/defaults.py); the
# recorded snippet cases start from them too. Dropout is off: the smoke run is compared step by step
# with the solution's, and torch draws other dropout masks on other CPU builds (where self.dropout
# is applied is checked by the snippets' training-mode cases, with fixed masks).
SMALL = ["model.change_detector.feat_dim", "10", "model.change_detector.att_dim", "16",
         "model.change_detector.att_head", "4", "model.change_detector.emb_dim", "20",
         "model.change_detector.grid", "8", "model.change_detector.mtm_chunk", "2",
         "model.change_detector.dropout", "0.0", "model.speaker.word_dim", "12",
         "model.speaker.att_dim", "16", "model.speaker.att_head", "4", "model.speaker.vocab_size", "11",
         "model.speaker.seq_length", "7", "model.speaker.dropout", "0.0", "model.cbr.att_dim", "16",
         "model.cbr.att_head", "4"]
SMOKE = "smoke run"  # the check's name, and the key of its case among the hidden cases
SMOKE_STEPS = 30
SMOKE_BATCH = 4
SMOKE_LR = 5e-3
LOSSES = ("total", "caption", "cross_view", "cross_modal")  # CaptionModel.forward's keys
SMOKE_INPUTS = ("weights", "batch")  # what a child gets of the smoke case; the rest are the answers


def snippet_results(name, cases):
    """{"results": [one result per case, as tests/snippet_cases.compute gives it, or {"error"}]},
    or {"error"} when the snippet's file does not import."""
    try:
        snippet_cases.snippet_class(name)
    except BaseException as error:  # anything at import: SyntaxError, SystemExit, a missing class...
        return {"error": snippet_cases.describe_error(error)}
    results = []
    for case in cases:
        try:
            results.append(snippet_cases.compute(name, case))
        except BaseException as error:
            results.append({"error": snippet_cases.describe_error(error)})
    return {"results": results}


def smoke_batch(generator, B=SMOKE_BATCH, L=7, vocab=11, grid=(3, 4), channels=8):
    """A fixed random batch: features (B, C, H, W) and one caption per pair."""
    def captions():
        lengths = torch.randint(3, L, (B,), generator=generator)  # index of <END>
        labels = torch.randint(4, vocab, (B, 1, L), generator=generator)
        positions = torch.arange(L).view(1, 1, L)
        end = lengths.view(B, 1, 1)
        labels[:, :, 0] = 2  # <START>
        labels = torch.where(positions == end, torch.full_like(labels, 3), labels)  # <END>
        labels = labels.masked_fill(positions > end, 0)  # <NULL>
        return labels, (positions <= end).float()

    feats = {k: torch.randn(B, channels, *grid, generator=generator) for k in ("d_feat", "q_feat", "n_feat")}
    pos_labels, pos_masks = captions()
    neg_labels, neg_masks = captions()
    return {**feats, "pos_labels": pos_labels, "pos_masks": pos_masks,
            "neg_labels": neg_labels, "neg_masks": neg_masks}


class OtherParameters(Exception):
    """The files build a model whose parameters are not the handed-out ones (names or shapes)."""


def smoke_model(weights):
    """The whole model (SMALL) built from this checkout's files, with ``weights`` {name: tensor}: the
    recorded initial parameters, so that the files' own initialisation does not matter."""
    from models.captioner import CaptionModel

    cfg = load_config(None, SMALL + ["train.optim.lr", str(SMOKE_LR)])
    model = CaptionModel(cfg)
    built = {name: tuple(p.shape) for name, p in model.named_parameters()}
    given = {name: tuple(w.shape) for name, w in weights.items()}
    if built != given:
        extra = sorted(set(built) - set(given))
        missing = sorted(set(given) - set(built))
        reshaped = sorted(name for name in set(built) & set(given) if built[name] != given[name])
        found = "; ".join(f"{what}: {', '.join(names[:3])}" for what, names in (
            ("parameters not handed out", extra), ("handed-out parameters missing", missing),
            ("parameters of another shape", reshaped)) if names)
        raise OtherParameters(f"the model built from the four files does not have the handed-out parameters "
                         f"({found}); keep the code outside the blocks as handed out")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(weights[name])
    return model, cfg


def smoke_train(model, cfg, batch):
    """SMOKE_STEPS of train.py's training step (models/training.py) on ``batch``, then greedy decoding:
    {"losses": {name: [value before each step]} for each of LOSSES (stopping at a non-finite total, recorded
    as NaN), "tokens", "logprobs" (B, seq_length)}."""
    from models.training import TrainingError, build, train_step

    device = torch.device("cpu")
    state = build(cfg, device, model)
    losses = {name: [] for name in LOSSES}
    model.train()
    for _ in range(SMOKE_STEPS):
        try:
            values = train_step(state, model, batch, cfg, device, per_epoch=SMOKE_STEPS + 1)
        except TrainingError:  # a non-finite loss (train.on_nonfinite_loss stop)
            values = {name: math.nan for name in LOSSES}
        for name in LOSSES:
            losses[name].append(float(values[name]))
        if not math.isfinite(losses["total"][-1]):
            break
    model.eval()
    tokens, logprobs, _, _ = model.generate(batch["d_feat"], batch["q_feat"])
    return {"losses": losses, "tokens": tokens.detach().clone(), "logprobs": logprobs.detach().clone()}


def smoke_run(case):
    """The smoke run of this checkout's whole model on the case's inputs (SMOKE_INPUTS): what
    smoke_train returns, or {"error"}."""
    try:
        return smoke_train(*smoke_model(case["weights"]), case["batch"])
    except OtherParameters as error:
        return {"error": str(error)}
    except BaseException as error:
        return {"error": snippet_cases.describe_error(error)}


def probe(hidden):
    """What the sandbox leaves this process: its user, a stdlib module not loaded yet, the network,
    and whether the paths meant to be hidden can be read."""
    found = {"uid": os.getuid()}
    try:
        found["stdlib"] = importlib.import_module("colorsys") is not None  # small, never imported before
    except Exception as error:
        found["stdlib"] = f"{type(error).__name__}: {error}"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        found["network"] = True
    except OSError:
        found["network"] = False
    found["hidden_readable"] = [path for path in hidden if _readable(path)]
    return found


def _readable(path):
    """Whether a file of ``path`` can be read (inside a folder: any file, the Python installation aside)."""
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    try:
        if not os.path.isdir(path):
            with open(path, "rb") as handle:
                handle.read(1)
            return True
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if os.path.join(folder, d) not in python]
            if names:
                return True
        return False
    except OSError:
        return False


def run(job):
    """The body of the child: computes what the job asks for and saves it to OUTPUTS in the working folder."""
    if job["kind"] == "probe":
        result = {**probe(job["hidden"]), **job["sandbox"]}
    elif job["kind"] == "smoke":
        result = smoke_run(torch.load(job["inputs"], weights_only=True))
    else:
        result = snippet_results(job["snippet"], torch.load(job["inputs"], weights_only=True))
    torch.save(result, OUTPUTS)
