"""Data-parallel training over K processes started by torchrun (one GPU each, or gloo on the CPU).

Each rank takes a contiguous slice of every global batch (rank r holds rows r*b .. r*b + b - 1).
The contrastive similarities gather the keys and the similarity rows of all ranks, with gradients,
so every rank computes the InfoNCE losses of the whole (B, B) matrix, as one process would.
DistributedDataParallel averages gradients over the K ranks; gathering returns K times the
gradient of each rank's own rows, and the caption loss is a rank's token sum times K over the
global token count, so the averaged gradient is the gradient of the one-process loss.
With one process every function here is the identity, and nothing is gathered.
"""
import os

import torch
import torch.distributed as dist

from utils.errors import UserError


class DistributedError(UserError):
    """A multi-process run that cannot start; the message says why and what to do."""


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    return rank() == 0


def init_from_env(gpu_id):
    """Joins the process group when torchrun started several processes; returns the training device.

    NCCL and the GPU numbered LOCAL_RANK when gpu_id >= 0 and CUDA is present, else gloo on the CPU.
    Returns None when this is a single-process run (the caller picks the device as usual).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = gpu_id is not None and gpu_id >= 0 and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} "
                                   f"GPUs; start torchrun with --nproc_per_node at most that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return device


def check_batch_size(batch_size):
    """The global batch must split evenly: every rank's slice has the same size."""
    if batch_size % world_size():
        raise DistributedError(f"data.train.batch_size ({batch_size}) must be divisible by the number of "
                               f"processes ({world_size()}); change one of them")


def local_slice(indices):
    """This rank's contiguous share of a global batch (the whole batch with one process)."""
    world = world_size()
    if world == 1:
        return indices
    size = len(indices) // world
    return indices[rank() * size:(rank() + 1) * size]


class _GatherBatch(torch.autograd.Function):
    """Concatenates every rank's (b, ...) tensor along dim 0; backward sums the gradients of all ranks."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        parts[rank()] = x  # the local rows are this very tensor
        ctx.rows = x.size(0)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # each rank's loss depends on every rank's rows
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_batch(x):
    """(b, ...) local rows -> (K*b, ...) rows of the global batch in rank order, with gradients."""
    if world_size() == 1:
        return x
    return _GatherBatch.apply(x)


def global_token_mean(local_mean, local_count):
    """A rank's objective for a mean over the tokens of the whole batch (see the module docstring).

    local_mean: the mean over this rank's local_count tokens. Returns K * local sum / global count;
    the mean of this over ranks is the global mean.
    """
    if world_size() == 1:
        return local_mean
    total = local_count.detach().to(torch.float64).clone()
    dist.all_reduce(total)
    return local_mean * (local_count.to(local_mean.dtype) * world_size() / total.to(local_mean.dtype))


def average_over_ranks(values):
    """{name: scalar tensor} -> {name: float}, averaged over ranks (the one-process values)."""
    names = list(values)
    stacked = torch.stack([values[name].detach().float() for name in names])
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked = stacked / world_size()
    return dict(zip(names, stacked.tolist()))


def any_rank(flag):
    """True on every rank when ``flag`` is True on at least one."""
    if world_size() == 1:
        return flag
    found = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(found)
    return found.item() > 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def shutdown():
    if world_size() > 1:
        dist.destroy_process_group()
