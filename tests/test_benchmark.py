"""research/benchmark.py: its three variants give the same results, and its command line works.

Cached decoding against recomputing the prefix is also tested in
tests/test_decoder.py::test_cached_decoding_equals_recomputing_the_prefix (greedy and beam search).
"""
import json

import pytest

from research import benchmark

SMALL = ["--batch_size", "4", "--grid", "3", "--steps", "1", "--cfg", "configs/dynamic/transformer_quick.yaml",
         "model.change_detector.feat_dim", "10", "model.change_detector.att_dim", "16",
         "model.change_detector.emb_dim", "16", "model.speaker.att_dim", "16", "model.speaker.word_dim", "12",
         "model.cbr.att_dim", "16", "model.speaker.seq_length", "7", "model.speaker.vocab_size", "11"]


@pytest.mark.snippets
@pytest.mark.parametrize("beam_size", [1, 2])
def test_every_variant_gives_the_straightforward_losses_gradients_and_tokens(beam_size):
    # Dropout stays on: all variants draw the same masks.
    args = benchmark.parse_args(SMALL)
    cfg, device, models, batch = benchmark.setup(args)
    straightforward = models["straightforward"]
    assert straightforward.change_detector.scorer[0].attention.mtm.when == "always"
    assert not straightforward.change_detector.scorer[0].attention.mtm.sparse_backward
    assert straightforward.change_detector.scorer[0].attention.mtm.chunk == 4
    check = benchmark.compare(models, batch, cfg, device, beam_size)
    assert check["losses_equal"] and check["tokens_equal"]
    assert check["grads_allclose"], check["max_grad_diff"]


@pytest.mark.snippets
def test_benchmark_cli_prints_every_variant_and_the_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main([*SMALL[:8], "--skip_memory", "--json", str(out), *SMALL[8:]])
    printed = capsys.readouterr().out
    assert "straightforward" in printed and "recompute" in printed and "outputs agree" in printed
    report = json.loads(out.read_text())
    assert report["check"] == {**report["check"], "losses_equal": True, "grads_allclose": True, "tokens_equal": True}
    for variant in benchmark.VARIANTS:
        assert report["results"][variant]["train_step_s"] > 0
        assert report["results"][variant]["generate_pairs_per_s"] > 0
    assert set(report["ratios"]) == {"train_speedup", "generate_speedup"}


@pytest.mark.snippets
def test_memory_probe_runs_in_a_fresh_process():
    args = benchmark.parse_args(SMALL)
    peak = benchmark.measure_memory(args, "recompute", "train")
    assert 0 <= peak < 2 ** 30  # a tiny model's step


def test_benchmark_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--batch_size", "0"])
    assert exit_info.value.code == 2
    assert "--batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--cfg", "configs/none.yaml"])
    assert exit_info.value.code == 2
    assert "configs/none.yaml does not exist" in capsys.readouterr().err


def test_loader_benchmark_writes_distinct_files_packs_them_and_reports(tmp_path, capsys):
    from research import benchmark_loader

    scratch = tmp_path / "scratch"
    benchmark_loader.main(["--scratch", str(scratch), "--scenes", "16", "--workers", "0", "--archive",
                           "--cfg", "configs/dynamic/transformer_demo.yaml", "data.train.batch_size", "8"])
    out = capsys.readouterr().out
    assert "wrote 3 x 16 feature files of float32 (274, 7, 7)" in out
    for layout in ("loose float32 files", "float16 store", "float32 store"):
        assert f"{layout}: 16 scenes, batches of 8 in training order" in out
    assert "packed from the archive as a stream into float16" in out
    line = next(line for line in out.splitlines() if line.startswith("per image: "))
    loose, half, full = (float(part.split()[-2]) for part in line[len("per image: "):].split(", "))
    assert loose == 0.054 and half < full  # 274 x 7 x 7 x 4 bytes and a .npy header; the stores add their index
    assert not scratch.exists()  # removed without --keep
