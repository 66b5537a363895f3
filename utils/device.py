"""The one device setting: which device a run uses, autocast on GPU only, moving batches there."""
import contextlib
import warnings

import torch

from utils.errors import UserError


class DeviceError(UserError):
    """A GPU was asked for that torch cannot use; the message says why and how to fix it."""


def _cuda_diagnosis():
    """(usable, reason): whether torch can use CUDA here, and in words why not."""
    if torch.version.cuda is None:
        return False, (f"this torch ({torch.__version__}) is a CPU-only build. Install a CUDA build of "
                       f"torch (pytorch.org lists the pip command for each CUDA version)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return True, ""
    said = " ".join(" ".join(str(warning.message).split()) for warning in caught)
    if "driver" in said.lower():
        return False, (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, and the NVIDIA "
                       f"driver cannot run it ({said[:300]}). Install a torch build for the CUDA version "
                       f"your driver supports (nvidia-smi shows it), or update the driver")
    return False, (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable NVIDIA GPU"
                   + (f" ({said[:300]})" if said else " (no GPU or driver, or CUDA_VISIBLE_DEVICES hides it)"))


def select_device(gpu_id):
    """CUDA device ``gpu_id``, or the CPU for gpu_id -1; a GPU that cannot be used is a DeviceError."""
    if gpu_id is None or gpu_id < 0:
        return torch.device("cpu")
    usable, reason = _cuda_diagnosis()
    if not usable:
        raise DeviceError(f"GPU {gpu_id} was asked for (--gpu or gpu_id) but {reason}; or pass --gpu -1 "
                          f"to run on the CPU")
    count = torch.cuda.device_count()
    if gpu_id >= count:
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(count))
        raise DeviceError(f"GPU {gpu_id} does not exist; this machine has {count} ({names}). Pass --gpu "
                          f"with one of those ids, or --gpu -1 for the CPU")
    return torch.device("cuda", gpu_id)


def working_gpu_id():
    """The --gpu value that works here: 0 when torch can use a GPU, else -1 (the CPU)."""
    return 0 if _cuda_diagnosis()[0] and torch.cuda.device_count() > 0 else -1


def describe(device):
    return str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")


def autocast_context(device, amp):
    """bf16/fp16 autocast on CUDA when asked; a no-op on the CPU."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def move_batch(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
