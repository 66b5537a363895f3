"""What the command-line tools share: flags anywhere among the KEY VALUE overrides, one-line errors."""
import argparse
import shlex
import sys

from configs.defaults import ConfigError
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
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an iteration, 'best' or 'last', got {text!r}") from None


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


def snapshot_for(cfg, choice, config_file, script, argv):
    """The iteration --snapshot ``choice`` names in cfg's experiment (errors carry the command that works)."""
    return resolve_snapshot(cfg, choice, config_file,
                            lambda other_config, snapshot: command_with(script, argv, cfg=other_config, snapshot=snapshot))
