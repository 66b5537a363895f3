"""The one tree of configuration defaults.

Every key the project reads is declared here with a comment; every numeric key's comment ends
with its allowed range, e.g. ``[1, inf)``, which load_config enforces (the ranges are read from
these comments, so the documentation is the rule). A YAML file is merged on top, then
command-line ``KEY VALUE`` pairs, then the tree is checked and frozen. Unknown keys, values of the
wrong type or outside their range, and keys that contradict each other are rejected with a
ConfigError naming the key (see ``load_config``).
"""
import ast
import math
import os
import re

import yaml
from yacs.config import CfgNode as CN

_C = CN()

_C.exp_name = "SCORER+CBR"  # outputs go to <exp_dir>/<exp_name>/: one folder name (letters, digits, + - _ .)
_C.exp_dir = "experiments"  # root folder of all experiments (a directory or a symlink)
_C.gpu_id = 0  # CUDA device index; -1 runs on the CPU (a GPU that torch cannot use is an error) [-1, inf)
_C.seed = 1111  # seeds python, numpy and torch [0, inf)

# ---------------------------------------------------------------------------------------
_C.model = CN()
_C.model.change_detector = CN()  # the SCORER encoder (models/SCORER.py: ChangeDetector)
_C.model.change_detector.feat_dim = 1026  # input channels: 1024 ResNet-101 layer3 + 2 coordinates [3, inf)
_C.model.change_detector.att_dim = 512  # d: token width inside the encoder, even, a multiple of att_head [2, inf)
_C.model.change_detector.att_head = 8  # h: attention heads [1, inf)
_C.model.change_detector.att_layer = 2  # number of SCORER blocks (weights shared by both views) [1, inf)
_C.model.change_detector.emb_dim = 512  # width of the difference representation fed to the decoder [1, inf)
_C.model.change_detector.grid = 14  # largest H and W the learned position embeddings cover [1, inf)
_C.model.change_detector.dropout = 0.1  # dropout on attention maps and after embed_fc [0, 1)
_C.model.change_detector.mtm = "sum"  # "sum": dot product over all heads (reference); "per_head": mean of per-head TMs
_C.model.change_detector.mtm_chunk = 4  # batch rows per MTM chunk: bounds the B x B x N x N memory [1, inf)
_C.model.change_detector.mtm_sparse_backward = True  # MTM backward from the argmax indices (same result, faster)
_C.model.change_detector.encoder = "scorer"  # "scorer" (the paper); "subtraction": no SCORER blocks, no L_cv (ablation, models/baselines.py)

_C.model.speaker = CN()  # the transformer decoder (models/transformer_decoder.py: Speaker)
_C.model.speaker.word_dim = 300  # word embedding width [1, inf)
_C.model.speaker.att_dim = 512  # hidden width of the decoder layers, a multiple of att_head [1, inf)
_C.model.speaker.att_head = 8  # attention heads [1, inf)
_C.model.speaker.layer = 2  # decoder layers [1, inf)
_C.model.speaker.vocab_size = 76  # V, including <NULL> <UNK> <START> <END>; the vocab json decides [5, inf)
_C.model.speaker.seq_length = 24  # L: longest caption in tokens, <START> and <END> counted [3, inf)
_C.model.speaker.dropout = 0.1  # dropout in the decoder [0, 1)
_C.model.speaker.share_wd_cls_weight = False  # tie the output layer to the word embedding (needs word_dim == att_dim)
_C.model.speaker.label_smoothing = 0.0  # 0 gives plain cross-entropy (the paper); else the reference's smoothing [0, 1)

_C.model.cbr = CN()  # cross-modal backward reasoning head (models/CBR.py: CBR)
_C.model.cbr.att_dim = 512  # d: must equal the encoder's att_dim [1, inf)
_C.model.cbr.att_head = 8  # heads of the hallucination self-attention [1, inf)

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
_C.data.swap_prob = 0.5  # train only: chance to swap the default and distractor features [0, 1]
_C.data.feature_store = ""  # "": read the three feature folders above; a .h5 file: read the feature store that scripts/pack_features.py packs (it holds all three sets, and the folders are not read)
_C.data.in_memory = False  # load every feature file once and keep it in RAM (small data sets)
_C.data.num_workers = -1  # DataLoader worker processes; 0 loads in the main process, -1: min(4, CPU cores) [-1, inf)
_C.data.subset_seed = 0  # seed of the max_samples subsets (the same ids for every run and seed) [0, inf)

_C.data.extraction = CN()  # how the features were extracted (scripts/extract_features.py); feature stores and folders record theirs, and the loader checks it against these
_C.data.extraction.model = "resnet101"  # the torchvision ResNet
_C.data.extraction.stage = 3  # the network is cut after layer<stage> [1, 4]
_C.data.extraction.image_size = (224, 224)  # height and width the images are resized to (bicubic): 2 integers, each [1, inf)
_C.data.extraction.weights = "imagenet"  # "imagenet", "random" (seeded, BatchNorm statistics re-estimated on the images) or a state-dict file
_C.data.extraction.seed = 0  # seed of the random weights [0, inf)
_C.data.extraction.output_grid = ()  # average-pool the grid to (H, W); () keeps the network's grid: 0 or 2 integers, each [1, inf)
_C.data.extraction.append_color = False  # append 18 channels of colour statistics per grid cell (the CPU demo)
_C.data.extraction.color_weight = 1.0  # factor on those colour channels [0, inf)

_C.data.train = CN()
_C.data.train.batch_size = 128  # scene ids per batch; each gives a changed and a distractor pair [1, inf)
_C.data.train.seq_per_img = 1  # captions drawn per pair and iteration [1, inf)
_C.data.train.max_samples = -1  # use N ids of the split, in the split's shares of change types; -1 uses all [-1, inf)
_C.data.val = CN()
_C.data.val.batch_size = 128  # scene ids per validation batch [1, inf)
_C.data.val.max_samples = -1  # N validation ids, in the split's shares of change types; -1 uses all [-1, inf)
_C.data.test = CN()
_C.data.test.batch_size = 128  # scene ids per test batch [1, inf)
_C.data.test.max_samples = -1  # N test ids, in the split's shares of change types; -1 uses all [-1, inf)

# ---------------------------------------------------------------------------------------
_C.train = CN()
_C.train.max_iter = 10000  # optimiser steps [1, inf)
_C.train.snapshot_interval = 1000  # save a snapshot and score the validation split every N steps [1, inf)
_C.train.log_interval = 20  # a log line (file, console, dashboard) every N steps [1, inf)
_C.train.lambda_v = 0.1  # weight of the cross-view InfoNCE loss L_cv [0, inf)
_C.train.lambda_m = 0.001  # weight of the cross-modal (CBR) InfoNCE loss L_cm [0, inf)
_C.train.grad_clip = 0.0  # clip the global gradient norm to this; 0 disables [0, inf)
_C.train.max_logit_scale = 4.605170185988092  # log(100): clamp of the logit scales after each step [0, inf)
_C.train.amp = "none"  # "none", "bf16" or "fp16": autocast dtype on a GPU (the CPU runs float32); fp16 also scales the loss (a gradient scaler) and skips steps whose gradients overflow
_C.train.beam_size = 1  # beam width of the validation captions (1 is greedy) [1, inf)
_C.train.recompute_attention = False  # rebuild the attention maps and other cheap activations of the encoder, the decoder and the CBR head in backward instead of storing them (models/captioner.py: CaptionModel.run): same results, about 0.6 of the memory, about 8 % slower (docs/performance.md)
_C.train.compile = False  # torch.compile the model (worth it on a GPU; the first steps compile, slowly)
_C.train.on_nonfinite_loss = "stop"  # "stop": end with an error at a NaN/Inf loss; "skip": drop that batch

_C.train.optim = CN()
_C.train.optim.type = "adam"  # only Adam is supported
_C.train.optim.lr = 2e-4  # learning rate (0, inf)
_C.train.optim.betas = (0.9, 0.999)  # Adam betas: 2 values, each [0, 1)
_C.train.optim.eps = 1e-8  # Adam epsilon (0, inf)
_C.train.optim.weight_decay = 0.0  # L2 penalty [0, inf)
_C.train.optim.step_size = 15  # StepLR: epochs between learning-rate drops [1, inf)
_C.train.optim.gamma = 0.1  # StepLR: factor of each drop (0, 1]

# ---------------------------------------------------------------------------------------
_C.logger = CN()
_C.logger.visdom = True  # plot to a visdom server; training goes on without one
_C.logger.server = "http://127.0.0.1"  # visdom server address
_C.logger.port = 8097  # visdom server port [1, 65535]
_C.logger.num_val_captions = 5  # validation captions shown in the dashboard's text pane [0, inf)


def get_cfg_defaults():
    """A fresh, mutable copy of the defaults."""
    return _C.clone()


def shipped_configs():
    """The YAML files of configs/dynamic/ (paper, quick, demo), as paths relative to the working folder when
    it is the repository root (the way the docs print them), else absolute."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dynamic")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".yaml"))
    return [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p for p in paths]


# Keys whose value must be one of a few words.
_CHOICES = {
    "model.change_detector.mtm": ("sum", "per_head"),
    "model.change_detector.encoder": ("scorer", "subtraction"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.on_nonfinite_loss": ("stop", "skip"),
    "train.optim.type": ("adam",),
    "data.extraction.model": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
}
EXP_NAME = re.compile(r"[A-Za-z0-9+_.-]+")
_RANGE = re.compile(r"([\[(])\s*(-inf|-?[0-9.e+-]+)\s*,\s*(inf|-?[0-9.e+-]+)\s*([\])])\s*$")


def _ranges_from_comments():
    """{dotted key: (low, low_closed, high, high_closed)} from the ranges closing the comments above."""
    ranges = {}
    with open(os.path.abspath(__file__)) as handle:
        for line in handle:
            match = re.match(r"_C\.([\w.]+) = .*#(.*)$", line.rstrip())
            found = match and _RANGE.search(match.group(2))
            if found:
                ranges[match.group(1)] = (float(found.group(2)), found.group(1) == "[",
                                          float(found.group(3)), found.group(4) == "]")
    return ranges


_LENGTHS = re.compile(r"(\d+)(?: or (\d+))? (values|integers)")


def _lengths_from_comments():
    """{dotted key: (allowed lengths, integers only)} of the tuple keys, from the "N values", "N or M values" or
    "N integers" of their comments."""
    lengths = {}
    with open(os.path.abspath(__file__)) as handle:
        for line in handle:
            match = re.match(r"_C\.([\w.]+) = \(.*#(.*)$", line.rstrip())
            found = match and _LENGTHS.search(match.group(2))
            if found:
                lengths[match.group(1)] = (tuple(int(n) for n in found.groups()[:2] if n is not None),
                                           found.group(3) == "integers")
    return lengths


RANGES = _ranges_from_comments()
LENGTHS = _lengths_from_comments()


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


def get_key(cfg, key):
    """The value of a dotted key, e.g. get_key(cfg, "data.train.batch_size")."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _in_range(value, low, low_closed, high, high_closed):
    if isinstance(value, float) and math.isnan(value):
        return False
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return above and below


def _range_text(low, low_closed, high, high_closed):
    def number(v):
        return "inf" if math.isinf(v) and v > 0 else "-inf" if math.isinf(v) else f"{v:g}"
    return f"{'[' if low_closed else '('}{number(low)}, {number(high)}{']' if high_closed else ')'}"


def check_config(cfg):
    """ConfigError for a value outside its choices or range, or keys that contradict each other."""
    for key, allowed in _CHOICES.items():
        if get_key(cfg, key) not in allowed:
            raise ConfigError(f"{key} is {get_key(cfg, key)!r}; it must be one of {', '.join(allowed)}")
    for key, (lengths, integers) in LENGTHS.items():
        value = get_key(cfg, key)
        kind = "integers" if integers else "values"
        if len(value) not in lengths or integers and not all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in value):
            raise ConfigError(f"{key} is {value!r}; it must hold {' or '.join(map(str, lengths))} {kind} "
                              f"(configs/defaults.py documents each key)")
    for key, bounds in RANGES.items():
        value = get_key(cfg, key)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise ConfigError(f"{key} is {value!r}; it must hold numbers (configs/defaults.py documents "
                                  f"each key)")
            if not _in_range(item, *bounds):
                raise ConfigError(f"{key} is {value!r}; it must lie in {_range_text(*bounds)} "
                                  f"(configs/defaults.py documents each key)")
    if cfg.exp_name in (".", "..") or not EXP_NAME.fullmatch(cfg.exp_name):
        raise ConfigError(f"exp_name {cfg.exp_name!r} must be one folder name made of letters, digits and "
                          f"+ - _ . (not '.' or '..'), e.g. SCORER+CBR_run2; put other folders in exp_dir")
    enc, dec, cbr = cfg.model.change_detector, cfg.model.speaker, cfg.model.cbr
    if enc.att_dim % enc.att_head or enc.att_dim % 2:
        raise ConfigError(f"model.change_detector.att_dim ({enc.att_dim}) must be even and a multiple of "
                          f"model.change_detector.att_head ({enc.att_head})")
    if dec.att_dim % dec.att_head:
        raise ConfigError(f"model.speaker.att_dim ({dec.att_dim}) must be a multiple of model.speaker.att_head "
                          f"({dec.att_head})")
    if cbr.att_dim != enc.att_dim or cbr.att_dim % cbr.att_head:
        raise ConfigError(f"model.cbr.att_dim ({cbr.att_dim}) must equal model.change_detector.att_dim "
                          f"({enc.att_dim}) and be a multiple of model.cbr.att_head ({cbr.att_head})")
    if dec.share_wd_cls_weight and dec.word_dim != dec.att_dim:
        raise ConfigError(f"model.speaker.share_wd_cls_weight needs model.speaker.word_dim == model.speaker.att_dim "
                          f"(got {dec.word_dim} and {dec.att_dim})")


def load_config(cfg_file=None, overrides=(), gpu_id=None):
    """Defaults, then ``cfg_file`` (YAML), then ``KEY VALUE`` overrides, then a --gpu choice
    (``gpu_id``, when given); returns a checked, frozen tree."""
    cfg = get_cfg_defaults()
    if cfg_file is not None:
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"config file {cfg_file} does not exist; pass one of the YAML files "
                              f"under configs/, e.g. --cfg configs/dynamic/transformer_quick.yaml")
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
    check_config(cfg)
    cfg.freeze()
    return cfg
