"""What the command-line tools share: flags anywhere among the KEY VALUE overrides, one-line errors."""
import argparse
import math
import shlex
import sys

from configs.defaults import ConfigError, load_config
from utils.device import DeviceError, select_device, working_gpu_id
from utils.errors import UserError
from utils.experiment import resolve_snapshot


def parse_with_overrides(parser, argv=None):
    """Parses the flags wherever they stand; the other words are the KEY VALUE config overrides (args.opts).

    `python train.py --cfg X train.max_iter 100 --gpu 0` and `... --gpu 0 train.max_iter 100` are the same.
    """
    args, rest = parser.parse_known_args(argv)
    flags = [word for word in rest if word.startswith("--")]
    if flags:
        parser.error(f"unknown option {flags[0]}; the options are listed by --help, and config overrides are "
                     f"KEY VALUE pairs without dashes (e.g. train.max_iter 100)")
    args.opts = rest
    return args


def snapshot_choice(text):
    """--snapshot: an iteration, "best" (highest validation CIDEr) or "last"."""
    if text in ("best", "last"):
        return text
    try:
        iteration = int(text)
    except ValueError:
        iteration = -1
    if iteration < 0:
        raise argparse.ArgumentTypeError(f"expected an iteration (0 or more), 'best' or 'last', got {text!r}")
    return iteration


def int_at_least(low, high=None):
    """An argparse type: an integer >= low (and <= high when given), else a usage error naming the range."""
    bounds = f"at least {low}" + (f" and at most {high}" if high is not None else "")
    return _bounded(int, "an integer", lambda value: low <= value and (high is None or value <= high), bounds,
                    f"integer >= {low}")


def number_at_least(low, above=False):
    """An argparse type: a finite number >= low (> low when ``above``), else a usage error naming the range."""
    return _bounded(float, "a number",
                    lambda value: math.isfinite(value) and (value > low if above else value >= low),
                    f"{'above' if above else 'at least'} {low:g}", f"number >= {low:g}")


def _bounded(convert, kind, within, bounds, name):
    """An argparse type: convert(text) when within() accepts it, else a usage error saying it must be ``bounds``."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not within(value):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = name
    return parse


def parse_grid(text):
    """An argparse type: a grid size, N or HxW with positive integers, as (H, W)."""
    try:
        sizes = [int(part) for part in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive integers (e.g. 7 or 7x7), got {text!r}")
    return tuple(sizes)


def report_errors(run, *args, **kwargs):
    """run(*args, **kwargs); a ConfigError or UserError becomes one `error:` line on stderr and exit status 2,
    and so does an error of the file system (a folder that cannot be written, a full disk)."""
    try:
        return run(*args, **kwargs)
    except (ConfigError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}; check that the folder exists, is writable and has free space",
              file=sys.stderr)
    sys.exit(2)


def command_with(script, argv, **flags):
    """`python script ...argv` with the given flags set (--name value): the command an error message offers."""
    words = [str(w) for w in argv]
    for name, value in flags.items():
        flag = f"--{name}"
        if flag in words[:-1]:
            words[words.index(flag) + 1] = str(value)
        else:
            words += [flag, str(value)]
    return " ".join(["python", script] + [shlex.quote(w) for w in words])


def device_for(cfg, script, argv):
    """The device cfg.gpu_id names; a GPU torch cannot use is a DeviceError ending with the command that works."""
    try:
        return select_device(cfg.gpu_id)
    except DeviceError as err:
        raise DeviceError(f"{err}. This works here: {command_with(script, argv, gpu=working_gpu_id())}") from None


def trained_experiment(args, script, argv):
    """(config, device, snapshot iteration) for a command that reads a trained experiment: the config of --cfg
    with its KEY VALUE overrides and --gpu, the device it names and the snapshot --snapshot names."""
    cfg = load_config(args.cfg, args.opts, gpu_id=args.gpu)
    device = device_for(cfg, script, argv)
    return cfg, device, snapshot_for(cfg, args.snapshot, args.cfg, script, argv)


def snapshot_for(cfg, choice, config_file, script, argv):
    """The iteration --snapshot ``choice`` names in cfg's experiment (errors carry the command that works)."""
    return resolve_snapshot(cfg, choice, config_file,
                            lambda other_config, snapshot: command_with(script, argv, cfg=other_config, snapshot=snapshot))
