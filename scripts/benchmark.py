"""Speed and memory of the model against a straightforward formulation of the same computation.

python scripts/benchmark.py [--cfg configs/dynamic/transformer.yaml] [--batch_size 32] [--grid 14]
                            [--device cpu|cuda] [--steps 3] [--amp none|bf16] [--beam_size 1] [KEY VALUE ...]
(e.g. `train.compile True` as an override benchmarks the torch.compile'd model)

"fast" is the model as train.py and test.py run it. "straightforward" is the same model, on the
same weights, with its fast paths switched off: the MTM similarity at every encoder block and in
evaluation, over the whole B x B x N x N score tensor at once (mtm_chunk = B) with plain autograd
(mtm_sparse_backward False), attention probabilities stored for backward (train.recompute_attention
False), and decoding that recomputes the whole prefix at every step
(use_cache=False). Random features and captions stand in for data. The script checks that both
give the same losses, gradients and generated tokens, then prints seconds per training step
(forward, backward, Adam step), generated pairs per second and peak memory of each, and the ratios.
Peak memory is the CUDA allocator's peak on a GPU; on the CPU it is the growth of the process's
peak resident set over one training step (or one generation), measured in a fresh process per variant
with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the resident set.
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from configs.defaults import ConfigError, load_config  # noqa: E402
from models.SCORER import Attention  # noqa: E402
from models.transformer_decoder import END, START  # noqa: E402
from utils.engine import CaptionModel, autocast_context  # noqa: E402

VARIANTS = ("fast", "straightforward")
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # float32 sums in another order (chunking, sparse vs dense products)
LOSS_RTOL = 1e-5


class BenchmarkError(RuntimeError):
    """Arguments the benchmark cannot run with."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="configs/dynamic/transformer.yaml", help="model config (YAML)")
    parser.add_argument("--batch_size", type=int, default=32, help="scene ids per training batch; pairs per generation batch")
    parser.add_argument("--grid", type=int, default=14, help="feature grid H = W (N = grid^2 tokens)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    parser.add_argument("--steps", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast dtype (CUDA only)")
    parser.add_argument("--beam_size", type=int, default=1, help="beam width of the generation benchmark")
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
    if V <= END + 1:
        raise BenchmarkError(f"model.speaker.vocab_size ({V}) leaves no word tokens")
    batch = {}
    for name in ("d_feat", "q_feat", "n_feat"):
        batch[name] = torch.rand(batch_size, channels, grid, grid, generator=generator)
    for kind in ("pos", "neg"):
        lengths = torch.randint(3, L + 1, (batch_size,), generator=generator)  # <START>, words, <END>
        labels = torch.randint(END + 1, V, (batch_size, L), generator=generator)
        positions = torch.arange(L).unsqueeze(0)
        labels[:, 0] = START
        labels = labels.masked_fill(positions == (lengths - 1).unsqueeze(1), END)
        masks = (positions < lengths.unsqueeze(1)).long()
        batch[f"{kind}_labels"] = (labels * masks).unsqueeze(1)  # (B, 1, L)
        batch[f"{kind}_masks"] = masks.unsqueeze(1)
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def straightforward(model, batch_size):
    """Switches the model's fast paths off (on the same weights) while inside."""
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    settings = [(m, "sparse_backward", False) for m in attentions + [model.cbr.contra]]
    settings += [(m, "mtm_chunk", batch_size) for m in attentions + [model.cbr.contra]]
    settings += [(m, "recompute", False) for m in attentions + [model.cbr] + list(model.speaker.core.layer)]
    saved = [(m, name, getattr(m, name)) for m, name, _ in settings]

    def every_block(module, query_states, key_states, value_states, compute_similarity=True):
        return Attention.forward(module, query_states, key_states, value_states, True)

    try:
        for module, name, value in settings:
            setattr(module, name, value)
        for module in attentions:
            module.forward = functools.partial(every_block, module)
        model.speaker.sample = functools.partial(type(model.speaker).sample, model.speaker, use_cache=False)
        yield model
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for module in attentions:
            module.__dict__.pop("forward", None)
        model.speaker.__dict__.pop("sample", None)


def variant(model, name, batch_size):
    return straightforward(model, batch_size) if name == "straightforward" else contextlib.nullcontext(model)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batch, cfg, device):
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device, cfg.train.amp):
        losses = model(batch, cfg.train.lambda_v, cfg.train.lambda_m)
    losses["total"].backward()
    optimizer.step()
    return losses


def generate(model, batch, cfg, device, beam_size):
    with autocast_context(device, cfg.train.amp):
        return model.generate(batch["d_feat"], batch["q_feat"], beam_size=beam_size)[0]


def interleaved(calls, steps, device):
    """Median seconds of each named call over ``steps`` rounds after a warm-up round.

    The calls alternate within each round, so that both see the same load on a shared machine.
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


def in_variant(model, name, batch_size, train, fn, *args):
    with variant(model, name, batch_size):
        model.train(train)
        return fn(model, *args)


def compare(model, initial, batch, cfg, device, beam_size):
    """Losses, gradients (before the optimiser step) and generated tokens of both variants."""
    outputs = {}
    for name in VARIANTS:
        model.load_state_dict(initial)
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in both
        with variant(model, name, batch["d_feat"].size(0)), autocast_context(device, cfg.train.amp):
            losses = model(batch, cfg.train.lambda_v, cfg.train.lambda_m)
            losses["total"].backward()
            model.eval()
            tokens = generate(model, batch, cfg, device, beam_size)
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        outputs[name] = ({k: v.item() for k, v in losses.items()}, grads, tokens)
    (loss_a, grad_a, tok_a), (loss_b, grad_b, tok_b) = outputs["fast"], outputs["straightforward"]
    loss_ok = all(abs(loss_a[k] - loss_b[k]) <= LOSS_RTOL * max(1.0, abs(loss_b[k])) for k in loss_a)
    grads_ok = grad_a.keys() == grad_b.keys() and all(
        torch.allclose(grad_a[k].float(), grad_b[k].float(), rtol=GRAD_RTOL, atol=GRAD_ATOL) for k in grad_a)
    worst = max((grad_a[k].float() - grad_b[k].float()).abs().max().item() for k in grad_a)
    return {"losses_equal": loss_ok, "grads_allclose": grads_ok, "tokens_equal": bool(torch.equal(tok_a, tok_b)),
            "loss_fast": loss_a["total"], "loss_straightforward": loss_b["total"], "max_grad_diff": worst}


def setup(args):
    cfg = build_config(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError("--device cuda but torch sees no GPU; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model = CaptionModel(cfg).to(device)
    if cfg.train.compile:
        model = torch.compile(model)
    batch = random_batch(cfg, args.batch_size, args.grid, device)
    return cfg, device, model, batch


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
    cfg, device, model, batch = setup(args)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.optim.lr)
    model.train(phase == "train")
    with variant(model, name, args.batch_size):
        if phase == "train":
            run = functools.partial(train_step, model, optimizer, batch, cfg, device)
        else:
            run = functools.partial(generate, model, batch, cfg, device, args.beam_size)
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
    result = subprocess.run(command + list(args.opts), capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise BenchmarkError(f"memory probe {name}:{phase} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_benchmark(args):
    cfg, device, model, batch = setup(args)
    initial = copy.deepcopy(model.state_dict())
    check = compare(model, initial, batch, cfg, device, args.beam_size)

    # One copy of the weights per variant, each with its own optimiser, timed in alternation.
    models = {name: copy.deepcopy(model) for name in VARIANTS}
    optimizers = {name: torch.optim.Adam(models[name].parameters(), lr=cfg.train.optim.lr) for name in VARIANTS}
    step_s = interleaved({name: functools.partial(in_variant, models[name], name, args.batch_size, True, train_step,
                                                  optimizers[name], batch, cfg, device) for name in VARIANTS},
                         args.steps, device)
    for name in VARIANTS:
        models[name].load_state_dict(initial)  # generate from the same weights
    gen_s = interleaved({name: functools.partial(in_variant, models[name], name, args.batch_size, False, generate,
                                                 batch, cfg, device, args.beam_size) for name in VARIANTS},
                        args.steps, device)
    del models, optimizers
    results = {name: {"train_step_s": step_s[name], "generate_pairs_per_s": args.batch_size / gen_s[name]}
               for name in VARIANTS}
    if not args.skip_memory:
        for name in VARIANTS:
            results[name]["train_peak_mib"] = measure_memory(args, name, "train") / 2**20
            results[name]["generate_peak_mib"] = measure_memory(args, name, "generate") / 2**20

    fast, plain = results["fast"], results["straightforward"]
    ratios = {"train_speedup": plain["train_step_s"] / fast["train_step_s"],
              "generate_speedup": fast["generate_pairs_per_s"] / plain["generate_pairs_per_s"]}
    if not args.skip_memory:
        ratios["train_memory_ratio"] = fast["train_peak_mib"] / plain["train_peak_mib"]
        ratios["generate_memory_ratio"] = fast["generate_peak_mib"] / plain["generate_peak_mib"]
    return {"device": str(device), "batch_size": args.batch_size, "grid": args.grid, "amp": args.amp,
            "beam_size": args.beam_size, "threads": torch.get_num_threads(), "check": check,
            "results": results, "ratios": ratios}


def print_report(report):
    print(f"device {report['device']} ({report['threads']} threads), batch {report['batch_size']}, "
          f"grid {report['grid']}x{report['grid']}, amp {report['amp']}, beam {report['beam_size']}")
    rows = [("train step (s)", "train_step_s", "{:.3f}"), ("generation (pairs/s)", "generate_pairs_per_s", "{:.1f}"),
            ("train peak memory (MiB)", "train_peak_mib", "{:.0f}"),
            ("generation peak memory (MiB)", "generate_peak_mib", "{:.0f}")]
    print(f"| {'':30} | {'fast':>10} | {'straightforward':>15} |")
    print(f"|{'-' * 32}|{'-' * 12}|{'-' * 17}|")
    for label, key, fmt in rows:
        if key in report["results"]["fast"]:
            fast, plain = report["results"]["fast"][key], report["results"]["straightforward"][key]
            print(f"| {label:30} | {fmt.format(fast):>10} | {fmt.format(plain):>15} |")
    ratios = report["ratios"]
    line = (f"training {ratios['train_speedup']:.2f}x faster, generation {ratios['generate_speedup']:.2f}x faster")
    if "train_memory_ratio" in ratios:
        line += (f"; peak memory fast/straightforward: training {ratios['train_memory_ratio']:.2f}, "
                 f"generation {ratios['generate_memory_ratio']:.2f}")
    print(line)
    check = report["check"]
    print(f"outputs agree: losses equal {check['losses_equal']} ({check['loss_fast']:.6f} vs "
          f"{check['loss_straightforward']:.6f}), gradients allclose {check['grads_allclose']} "
          f"(largest difference {check['max_grad_diff']:.2e}), generated tokens equal {check['tokens_equal']}")


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
        tmp_path = f"{args.json}.tmp"
        with open(tmp_path, "w") as handle:
            json.dump(report, handle, indent=1)
        os.replace(tmp_path, args.json)
    check = report["check"]
    if not (check["losses_equal"] and check["grads_allclose"] and check["tokens_equal"]):
        print("error: the fast and straightforward formulations disagree", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
