"""Speed and memory of the model against a straightforward formulation of the same computation.

python research/benchmark.py [--cfg configs/dynamic/transformer.yaml] [--batch_size 32] [--grid 14]
                            [--device cpu|cuda] [--steps 3] [--amp none|bf16] [--beam_size 1] [KEY VALUE ...]
(e.g. `train.compile True` as an override benchmarks the torch.compile'd model)

Three variants of the same model on the same weights, each built through CaptionModel's arguments
and config keys:
- "default": the model as train.py and test.py run it with the default configuration;
- "recompute": the same with train.recompute_attention (the encoder, decoder and CBR head keep their
  matrix products and rebuild the rest, the attention maps above all, in backward: the memory-saving
  option);
- "straightforward": the MTM similarity at every encoder block and in evaluation
  (similarity_in_every_block), over the whole B x B x N x N score tensor at once (mtm_chunk = B)
  with plain autograd (mtm_sparse_backward False), and decoding that recomputes the whole prefix
  at every step (use_cache=False).
Random features and captions stand in for data. The script checks that all three give the same
losses, gradients and generated tokens, then prints seconds per training step (train.py's step,
models/training.py: forward, backward, clipping, Adam step, logit-scale clamp), generated pairs per second and peak memory of each, and the ratios: speed of default
against straightforward, memory of recompute against straightforward.
Peak memory is the CUDA allocator's peak on a GPU; on the CPU it is the growth of the process's
peak resident set over one training step (or one generation), measured in a fresh process per variant
with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the resident set.
"""
import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import time

import torch

from configs.defaults import ConfigError, load_config
from models.captioner import CaptionModel
from models.training import build, train_step
from utils.cli import int_at_least
from utils.device import autocast_context
from utils.fileio import write_json_atomic
from utils.text import END_ID, START_ID

VARIANTS = ("default", "recompute", "straightforward")
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # float32 sums in another order (chunking, sparse vs dense products)
LOSS_RTOL = 1e-5
NO_EPOCH_END = 10 ** 9  # the training step's batches per epoch: the schedule does not step within a benchmark


class BenchmarkError(RuntimeError):
    """Arguments the benchmark cannot run with."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="configs/dynamic/transformer.yaml", help="model config (YAML)")
    parser.add_argument("--batch_size", type=int_at_least(1), default=32, help="scene ids per training batch; pairs per generation batch")
    parser.add_argument("--grid", type=int_at_least(1), default=14, help="feature grid H = W (N = grid^2 tokens)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    parser.add_argument("--steps", type=int_at_least(1), default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast dtype (CUDA only)")
    parser.add_argument("--beam_size", type=int_at_least(1), default=1, help="beam width of the generation benchmark")
    parser.add_argument("--skip_memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory_probe", choices=[f"{v}:{p}" for v in VARIANTS for p in ("train", "generate")],
                        help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def build_config(args):
    if args.batch_size < 1 or args.grid < 1 or args.steps < 1:
        raise BenchmarkError("--batch_size, --grid and --steps must be positive")
    overrides = list(args.opts) + ["model.change_detector.grid", str(args.grid), "train.amp", args.amp]
    return load_config(args.cfg, overrides)


def random_batch(cfg, batch_size, grid, device, seed=0):
    """Features (B, feat_dim - 2, grid, grid) and one caption per pair with <START> ... <END>."""
    generator = torch.Generator().manual_seed(seed)
    channels = cfg.model.change_detector.feat_dim - 2
    L, V = cfg.model.speaker.seq_length, cfg.model.speaker.vocab_size
    if V <= END_ID + 1:
        raise BenchmarkError(f"model.speaker.vocab_size ({V}) leaves no word tokens")
    batch = {}
    for name in ("d_feat", "q_feat", "n_feat"):
        batch[name] = torch.rand(batch_size, channels, grid, grid, generator=generator)
    for kind in ("pos", "neg"):
        lengths = torch.randint(3, L + 1, (batch_size,), generator=generator)  # <START>, words, <END>
        labels = torch.randint(END_ID + 1, V, (batch_size, L), generator=generator)
        positions = torch.arange(L).unsqueeze(0)
        labels[:, 0] = START_ID
        labels = labels.masked_fill(positions == (lengths - 1).unsqueeze(1), END_ID)
        masks = (positions < lengths.unsqueeze(1)).long()
        batch[f"{kind}_labels"] = (labels * masks).unsqueeze(1)  # (B, 1, L)
        batch[f"{kind}_masks"] = masks.unsqueeze(1)
    return {k: v.to(device) for k, v in batch.items()}


def build_variant(cfg, name, batch_size):
    """The model of one variant (fresh weights; callers load the shared ones)."""
    if name == "straightforward":
        cfg = cfg.clone()
        cfg.defrost()
        cfg.model.change_detector.mtm_chunk = batch_size
        cfg.model.change_detector.mtm_sparse_backward = False
        cfg.freeze()
        return CaptionModel(cfg, similarity_in_every_block=True)
    return CaptionModel(cfg, recompute=name == "recompute")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model, name, batch, cfg, device, beam_size):
    with autocast_context(device, cfg.train.amp):
        return model.generate(batch["d_feat"], batch["q_feat"], beam_size=beam_size,
                              use_cache=name != "straightforward").tokens


def interleaved(calls, steps, device):
    """Median seconds of each named call over ``steps`` rounds after a warm-up round.

    The calls alternate within each round, so that all see the same load on a shared machine.
    """
    times = {name: [] for name in calls}
    for round_index in range(steps + 1):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def compare(models, batch, cfg, device, beam_size):
    """Losses, gradients (before the optimiser step) and generated tokens of every variant against the
    straightforward one; the models hold the same weights."""
    outputs = {}
    for name, model in models.items():
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in all
        with autocast_context(device, cfg.train.amp):
            losses = model(batch, cfg.train.lambda_v, cfg.train.lambda_m)
        losses["total"].backward()
        model.eval()
        tokens = generate(model, name, batch, cfg, device, beam_size)
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        outputs[name] = ({k: v.item() for k, v in losses.items()}, grads, tokens)
        model.zero_grad(set_to_none=True)
    loss_b, grad_b, tok_b = outputs["straightforward"]
    check = {"losses_equal": True, "grads_allclose": True, "tokens_equal": True, "max_grad_diff": 0.0,
             "loss_straightforward": loss_b["total"]}
    for name in ("default", "recompute"):
        loss_a, grad_a, tok_a = outputs[name]
        check["losses_equal"] &= all(abs(loss_a[k] - loss_b[k]) <= LOSS_RTOL * max(1.0, abs(loss_b[k])) for k in loss_a)
        # A logit scale outside the loss gets a gradient only where every block computes S.
        shared = grad_a.keys() & grad_b.keys()
        check["grads_allclose"] &= set(grad_a) <= set(grad_b) and all(
            torch.allclose(grad_a[k].float(), grad_b[k].float(), rtol=GRAD_RTOL, atol=GRAD_ATOL) for k in shared)
        check["max_grad_diff"] = max([check["max_grad_diff"]] + [
            (grad_a[k].float() - grad_b[k].float()).abs().max().item() for k in shared])
        check["tokens_equal"] &= bool(torch.equal(tok_a, tok_b))
        check[f"loss_{name}"] = loss_a["total"]
    return check


def setup(args, names=VARIANTS):
    """(cfg, device, {variant: model with the same weights}, batch)."""
    cfg = build_config(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError("--device cuda but torch sees no GPU; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    weights = CaptionModel(cfg).state_dict()
    models = {}
    for name in names:
        model = build_variant(cfg, name, args.batch_size)
        model.load_state_dict(copy.deepcopy(weights))
        models[name] = torch.compile(model.to(device)) if cfg.train.compile else model.to(device)
    return cfg, device, models, random_batch(cfg, args.batch_size, args.grid, device)


def _status_bytes(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise BenchmarkError(f"/proc/self/status has no {field}: the CPU memory probe needs Linux")


def reset_peak_rss():
    """Sets the peak resident set (VmHWM) back to the current one (Linux 4.0+), so setup does not count."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def memory_probe(args):
    """Peak memory growth of one training step or one generation of one variant, in this (fresh) process."""
    name, phase = args.memory_probe.split(":")
    cfg, device, models, batch = setup(args, names=(name,))
    model = models[name]
    state = build(cfg, device, model)
    model.train(phase == "train")
    if phase == "train":
        run = functools.partial(train_step, state, model, batch, cfg, device, NO_EPOCH_END)
    else:
        run = functools.partial(generate, model, name, batch, cfg, device, args.beam_size)
    if device.type == "cuda":
        run()  # the CUDA peak is exact; a warm-up excludes one-off workspace allocations
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        reset_peak_rss()
        before = _status_bytes("VmRSS")
        run()
        peak = _status_bytes("VmHWM") - before
    print(json.dumps({"peak_bytes": peak}))


def measure_memory(args, name, phase):
    command = [sys.executable, os.path.abspath(__file__), "--memory_probe", f"{name}:{phase}"]
    for flag in ("cfg", "batch_size", "grid", "device", "amp", "beam_size"):
        command += [f"--{flag}", str(getattr(args, flag))]
    # glibc keeps freed blocks under its mmap threshold (up to 32 MiB) in the heap, so the resident set
    # would track the allocator's high-water mark, not live tensors; a fixed small threshold returns them.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command + list(args.opts), capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise BenchmarkError(f"memory probe {name}:{phase} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_benchmark(args):
    cfg, device, models, batch = setup(args)
    check = compare(models, batch, cfg, device, args.beam_size)
    weights = copy.deepcopy(models["default"].state_dict())
    states = {name: build(cfg, device, model) for name, model in models.items()}

    def step(name):
        models[name].train()
        return train_step(states[name], models[name], batch, cfg, device, NO_EPOCH_END)

    def caption(name):
        models[name].eval()
        return generate(models[name], name, batch, cfg, device, args.beam_size)

    step_s = interleaved({name: functools.partial(step, name) for name in VARIANTS}, args.steps, device)
    for model in models.values():
        model.load_state_dict(weights)  # generate from the same weights
    gen_s = interleaved({name: functools.partial(caption, name) for name in VARIANTS}, args.steps, device)
    results = {name: {"train_step_s": step_s[name], "generate_pairs_per_s": args.batch_size / gen_s[name]}
               for name in VARIANTS}
    if not args.skip_memory:
        for name in VARIANTS:
            results[name]["train_peak_mib"] = measure_memory(args, name, "train") / 2**20
            results[name]["generate_peak_mib"] = measure_memory(args, name, "generate") / 2**20

    default, recompute, plain = (results[name] for name in VARIANTS)
    ratios = {"train_speedup": plain["train_step_s"] / default["train_step_s"],
              "generate_speedup": default["generate_pairs_per_s"] / plain["generate_pairs_per_s"]}
    if not args.skip_memory:
        ratios["train_memory_ratio"] = recompute["train_peak_mib"] / plain["train_peak_mib"]
        ratios["train_memory_ratio_default"] = default["train_peak_mib"] / plain["train_peak_mib"]
        ratios["generate_memory_ratio"] = default["generate_peak_mib"] / plain["generate_peak_mib"]
    return {"device": str(device), "batch_size": args.batch_size, "grid": args.grid, "amp": args.amp,
            "beam_size": args.beam_size, "threads": torch.get_num_threads(), "check": check,
            "results": results, "ratios": ratios}


def print_report(report):
    print(f"device {report['device']} ({report['threads']} threads), batch {report['batch_size']}, "
          f"grid {report['grid']}x{report['grid']}, amp {report['amp']}, beam {report['beam_size']}")
    rows = [("train step (s)", "train_step_s", "{:.3f}"), ("generation (pairs/s)", "generate_pairs_per_s", "{:.1f}"),
            ("train peak memory (MiB)", "train_peak_mib", "{:.0f}"),
            ("generation peak memory (MiB)", "generate_peak_mib", "{:.0f}")]
    print(f"| {'':30} | {'default':>10} | {'recompute':>10} | {'straightforward':>15} |")
    print(f"|{'-' * 32}|{'-' * 12}|{'-' * 12}|{'-' * 17}|")
    for label, key, fmt in rows:
        if key in report["results"]["default"]:
            values = [fmt.format(report["results"][name][key]) for name in VARIANTS]
            print(f"| {label:30} | {values[0]:>10} | {values[1]:>10} | {values[2]:>15} |")
    ratios = report["ratios"]
    line = (f"default against straightforward: training {ratios['train_speedup']:.2f}x faster, "
            f"generation {ratios['generate_speedup']:.2f}x faster")
    if "train_memory_ratio" in ratios:
        line += (f"; training peak memory recompute/straightforward {ratios['train_memory_ratio']:.2f} "
                 f"(default/straightforward {ratios['train_memory_ratio_default']:.2f}), generation "
                 f"default/straightforward {ratios['generate_memory_ratio']:.2f}")
    print(line)
    check = report["check"]
    print(f"outputs agree: losses equal {check['losses_equal']} (default {check['loss_default']:.6f}, "
          f"recompute {check['loss_recompute']:.6f}, straightforward {check['loss_straightforward']:.6f}), "
          f"gradients allclose {check['grads_allclose']} (largest difference {check['max_grad_diff']:.2e}), "
          f"generated tokens equal {check['tokens_equal']}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.memory_probe:
            memory_probe(args)
            return
        report = run_benchmark(args)
    except (ConfigError, BenchmarkError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print_report(report)
    if args.json:
        write_json_atomic(args.json, report)
    check = report["check"]
    if not (check["losses_equal"] and check["grads_allclose"] and check["tokens_equal"]):
        print("error: the variants disagree (see 'outputs agree' above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
