"""The one tree of configuration defaults.

Every key the project reads is declared here with a comment. A YAML file is merged on top,
then command-line ``KEY VALUE`` pairs, then the tree is frozen. Unknown keys and values of the
wrong type are rejected with a message naming the key (see ``load_config``).
"""
import ast
import os

import yaml
from yacs.config import CfgNode as CN

_C = CN()

_C.exp_name = "SCORER+CBR"  # outputs go to <exp_dir>/<exp_name>/
_C.exp_dir = "experiments"  # root folder of all experiments (a directory or a symlink)
_C.gpu_id = 0  # CUDA device index; -1 forces the CPU; ignored when no GPU is present
_C.seed = 1111  # seeds python, numpy and torch

# ---------------------------------------------------------------------------------------
_C.model = CN()
_C.model.change_detector = CN()  # the SCORER encoder (models/SCORER.py: ChangeDetector)
_C.model.change_detector.feat_dim = 1026  # input channels: 1024 ResNet-101 layer3 + 2 coordinates
_C.model.change_detector.att_dim = 512  # d: token width inside the encoder
_C.model.change_detector.att_head = 8  # h: attention heads
_C.model.change_detector.att_layer = 2  # number of SCORER blocks (weights shared by both views)
_C.model.change_detector.emb_dim = 512  # width of the difference representation fed to the decoder
_C.model.change_detector.grid = 14  # largest H and W the learned position embeddings cover
_C.model.change_detector.dropout = 0.1  # dropout on attention maps and after embed_fc
_C.model.change_detector.mtm = "sum"  # "sum": dot product over all heads (reference); "per_head": mean of per-head TMs
_C.model.change_detector.mtm_chunk = 4  # batch rows per MTM chunk: bounds the B x B x N x N memory
_C.model.change_detector.mtm_sparse_backward = True  # MTM backward from the argmax indices (same result, faster)
_C.model.change_detector.encoder = "scorer"  # "scorer" (the paper); "subtraction": no SCORER blocks, no L_cv (ablation, models/baselines.py)

_C.model.speaker = CN()  # the transformer decoder (models/transformer_decoder.py: Speaker)
_C.model.speaker.word_dim = 300  # word embedding width
_C.model.speaker.att_dim = 512  # hidden width of the decoder layers
_C.model.speaker.att_head = 8  # attention heads
_C.model.speaker.layer = 2  # decoder layers
_C.model.speaker.vocab_size = 76  # V, including <NULL> <UNK> <START> <END>; must match the vocab json
_C.model.speaker.seq_length = 24  # L: longest caption in tokens, <START> and <END> counted
_C.model.speaker.dropout = 0.1  # dropout in the decoder
_C.model.speaker.share_wd_cls_weight = False  # tie the output layer to the word embedding (needs word_dim == att_dim)
_C.model.speaker.label_smoothing = 0.0  # 0 gives plain cross-entropy (the paper)

_C.model.cbr = CN()  # cross-modal backward reasoning head (models/CBR.py: CBR)
_C.model.cbr.att_dim = 512  # d: must equal the encoder's att_dim
_C.model.cbr.att_head = 8  # heads of the hallucination self-attention

# ---------------------------------------------------------------------------------------
_C.data = CN()
_C.data.dataset = "rcc_dataset"  # loader name (only one exists)
_C.data.default_img_dir = "data/images"  # "before" images
_C.data.semantic_img_dir = "data/sc_images"  # images after a semantic change
_C.data.nonsemantic_img_dir = "data/nsc_images"  # distractor images (camera / light only)
_C.data.default_feature_dir = "data/features"  # features of the "before" images
_C.data.semantic_feature_dir = "data/sc_features"  # features of the changed images
_C.data.nonsemantic_feature_dir = "data/nsc_features"  # features of the distractor images
_C.data.splits_json = "data/splits.json"  # {"train": [ids], "val": [...], "test": [...]}
_C.data.vocab_json = "data/transformer_vocab.json"  # word -> index
_C.data.h5_label_file = "data/transformer_labels.h5"  # encoded captions
_C.data.type_mapping_json = "data/type_mapping.json"  # change type -> ["000123.png", ...]
_C.data.anno_json = "data/total_change_captions_reformat.json"  # COCO ground truth for scoring
_C.data.swap_prob = 0.5  # train only: chance to swap the default and distractor features
_C.data.in_memory = False  # load every feature file once and keep it in RAM (small data sets)
_C.data.num_workers = 4  # DataLoader worker processes (0 loads in the main process)

_C.data.train = CN()
_C.data.train.batch_size = 128  # scene ids per batch; each gives a changed and a distractor pair
_C.data.train.seq_per_img = 1  # captions drawn per pair and iteration
_C.data.train.max_samples = -1  # use only the first N ids of the split; -1 uses all
_C.data.val = CN()
_C.data.val.batch_size = 128  # scene ids per validation batch
_C.data.val.max_samples = -1  # first N validation ids; -1 uses all
_C.data.test = CN()
_C.data.test.batch_size = 128  # scene ids per test batch
_C.data.test.max_samples = -1  # first N test ids; -1 uses all

# ---------------------------------------------------------------------------------------
_C.train = CN()
_C.train.max_iter = 10000  # optimiser steps
_C.train.snapshot_interval = 1000  # save a snapshot and score the validation split every N steps
_C.train.log_interval = 20  # a log line (file, console, dashboard) every N steps
_C.train.lambda_v = 0.1  # weight of the cross-view InfoNCE loss L_cv
_C.train.lambda_m = 0.001  # weight of the cross-modal (CBR) InfoNCE loss L_cm
_C.train.grad_clip = -1.0  # clip the global gradient norm to this; <= 0 disables
_C.train.max_logit_scale = 4.605170185988092  # log(100): clamp of the logit scales after each step
_C.train.amp = "none"  # "none", "bf16" or "fp16": autocast dtype, used on GPU only
_C.train.beam_size = 1  # beam width of the validation captions (1 is greedy)
_C.train.recompute_attention = False  # rebuild the attention blocks (encoder, CBR, decoder cross-attention) in backward instead of storing their activations: less memory, same results, slower
_C.train.compile = False  # torch.compile the model (worth it on a GPU; the first steps compile, slowly)
_C.train.on_nonfinite_loss = "stop"  # "stop": end with an error at a NaN/Inf loss; "skip": drop that batch

_C.train.optim = CN()
_C.train.optim.type = "adam"  # only Adam is supported
_C.train.optim.lr = 2e-4  # learning rate
_C.train.optim.betas = (0.9, 0.999)  # Adam betas
_C.train.optim.eps = 1e-8  # Adam epsilon
_C.train.optim.weight_decay = 0.0  # L2 penalty
_C.train.optim.step_size = 15  # StepLR: epochs between learning-rate drops
_C.train.optim.gamma = 0.1  # StepLR: factor of each drop

# ---------------------------------------------------------------------------------------
_C.logger = CN()
_C.logger.visdom = True  # plot to a visdom server; training goes on without one
_C.logger.server = "http://127.0.0.1"  # visdom server address
_C.logger.port = 8097  # visdom server port
_C.logger.num_val_captions = 5  # validation captions shown in the dashboard's text pane


def get_cfg_defaults():
    """A fresh, mutable copy of the defaults."""
    return _C.clone()


# Keys whose value must be one of a few words.
_CHOICES = {
    "model.change_detector.mtm": ("sum", "per_head"),
    "model.change_detector.encoder": ("scorer", "subtraction"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.on_nonfinite_loss": ("stop", "skip"),
    "train.optim.type": ("adam",),
}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


def _coerce(value, default, key, source):
    """value converted to the type of the default, or a ConfigError naming the key."""
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    raise ConfigError(f"{source}: {key} must be of type {type(default).__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")


def merge_dict(cfg, data, source, prefix=""):
    """Merges nested dict ``data`` into the unfrozen ``cfg``, checking keys and types (source names the origin)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys, "
                          f"got {type(data).__name__}")
    for key, value in data.items():
        full_key = prefix + str(key)
        if key not in cfg:
            raise ConfigError(f"{source}: unknown config key '{full_key}'; the keys are listed with "
                              f"comments in configs/defaults.py")
        if isinstance(cfg[key], CN):
            merge_dict(cfg[key], value, source, full_key + ".")
        else:
            cfg[key] = _coerce(value, cfg[key], full_key, source)


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(cfg_file=None, overrides=(), gpu_id=None):
    """Defaults, then ``cfg_file`` (YAML), then ``KEY VALUE`` overrides, then a --gpu choice
    (``gpu_id``, when given); returns a frozen tree."""
    cfg = get_cfg_defaults()
    if cfg_file is not None:
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"config file {cfg_file} does not exist; pass one of the YAML files "
                              f"under configs/, e.g. --cfg configs/dynamic/transformer.yaml")
        with open(cfg_file) as handle:
            try:
                data = yaml.safe_load(handle)
            except yaml.YAMLError as err:
                raise ConfigError(f"{cfg_file} is not valid YAML: {err}") from None
        merge_dict(cfg, data or {}, cfg_file)
    overrides = list(overrides) + ([] if gpu_id is None else ["gpu_id", str(gpu_id)])
    if len(overrides) % 2:
        raise ConfigError(f"command-line overrides come in KEY VALUE pairs; got {overrides}")
    for key, text in zip(overrides[0::2], overrides[1::2]):
        nested = _parse_value(text)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        merge_dict(cfg, nested, "command line")
    for key, allowed in _CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = value[part]
        if value not in allowed:
            raise ConfigError(f"{key} is {value!r}; it must be one of {', '.join(allowed)}")
    cfg.freeze()
    return cfg
