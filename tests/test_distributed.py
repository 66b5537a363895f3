"""Data-parallel training (utils/distributed.py): 2 gloo processes with half a batch each equal one process.

Tolerance: losses to 1e-5 relative, gradients to rtol 1e-4 / atol 1e-6 (float32 sums in another order:
per-rank token sums, all-reduced gradients, chunked similarities).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from utils.dataset import epoch_batches
from tests.helpers import small_cfg
from utils import distributed
from models.captioner import CaptionModel

WORLD = 2
BATCH = 4  # global batch: 2 scene ids per rank
RTOL, ATOL = 1e-4, 1e-6


def make_batch(cfg, batch_size, seed=0):
    """Random features (B, C, H, W) and one caption per pair: <START> words <END> <NULL>..."""
    generator = torch.Generator().manual_seed(seed)
    channels, grid = cfg.model.change_detector.feat_dim - 2, 3
    L, V = cfg.model.speaker.seq_length, cfg.model.speaker.vocab_size
    batch = {name: torch.rand(batch_size, channels, grid, grid, generator=generator)
             for name in ("d_feat", "q_feat", "n_feat")}
    for kind in ("pos", "neg"):
        lengths = torch.randint(3, L + 1, (batch_size,), generator=generator)
        positions = torch.arange(L).unsqueeze(0)
        labels = torch.randint(4, V, (batch_size, L), generator=generator)
        labels[:, 0] = 2
        labels = labels.masked_fill(positions == (lengths - 1).unsqueeze(1), 3)
        masks = (positions < lengths.unsqueeze(1)).long()
        batch[f"{kind}_labels"] = (labels * masks).unsqueeze(1)
        batch[f"{kind}_masks"] = masks.unsqueeze(1)
    return batch


def config(sparse):
    # No dropout: the ranks' dropout masks cannot match one process's.
    return small_cfg("model.change_detector.dropout", "0.0", "model.speaker.dropout", "0.0",
                     "model.change_detector.mtm_sparse_backward", str(sparse))


def losses_and_grads(model, batch, cfg):
    losses = model(batch, cfg.train.lambda_v, cfg.train.lambda_m)
    values = distributed.average_over_ranks(losses)
    losses["total"].backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    # A parameter outside the loss (an earlier block's logit scale) has no gradient, or a zero one.
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for k, p in module.named_parameters()}
    return values, grads


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        for sparse in (True, False):
            cfg = config(sparse)
            torch.manual_seed(0)
            model = DistributedDataParallel(CaptionModel(cfg), find_unused_parameters=True)
            rows = distributed.local_slice(list(range(BATCH)))
            batch = {k: v[rows] for k, v in make_batch(cfg, BATCH).items()}
            results[sparse] = losses_and_grads(model, batch, cfg)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.snippets
def test_two_processes_with_half_a_batch_equal_one_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for sparse in (True, False):
        cfg = config(sparse)
        torch.manual_seed(0)
        values, grads = losses_and_grads(CaptionModel(cfg), make_batch(cfg, BATCH), cfg)
        for rank_values, rank_grads in (result[sparse] for result in ranks):
            assert rank_values.keys() == values.keys()
            for name in values:
                assert rank_values[name] == pytest.approx(values[name], rel=1e-5), name
            for name, grad in grads.items():
                assert torch.allclose(rank_grads[name], grad, rtol=RTOL, atol=ATOL), (sparse, name)
        # The contrastive terms matter here: their gradients are not all zero.
        assert grads["cbr.contra.logit_scale"].abs() > 0
        assert grads["change_detector.scorer.1.attention.logit_scale"].abs() > 0


def test_each_rank_takes_a_contiguous_slice_of_the_global_batches(monkeypatch):
    global_batches = epoch_batches(24, 8, seed=3, epoch=1)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    slices = []
    for rank in range(4):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        slices.append([distributed.local_slice(batch) for batch in global_batches])
    for index, batch in enumerate(global_batches):
        assert sum((s[index] for s in slices), []) == batch  # rank order rebuilds the global batch
        assert all(len(s[index]) == 2 for s in slices)
    with pytest.raises(distributed.DistributedError, match="data.train.batch_size \\(6\\).*4"):
        distributed.check_batch_size(6)


def test_one_process_leaves_everything_as_it_is():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_batch(x) is x
    mean = torch.tensor(2.5)
    assert distributed.global_token_mean(mean, torch.tensor(7)) is mean
    assert distributed.local_slice([4, 5, 6]) == [4, 5, 6]
    assert distributed.average_over_ranks({"b": torch.tensor(1.5), "a": torch.tensor(2.0)}) == {"b": 1.5, "a": 2.0}
