"""Caption preprocessing: tokenising, vocabulary, label file layout, gaps in ids, errors."""
import json
import os

import h5py
import numpy as np
import pytest

from scripts.preprocess_captions_transformer import PreprocessError, main, preprocess
from utils.text import SPECIAL_TOKENS, build_vocab, decode, encode, tokenize


def test_tokenize_rules():
    assert tokenize("The Red cube, the ball; moved.") == \
        ["the", "red", "cube", ",", "the", "ball", ";", "moved"]
    assert tokenize("what changed?") == ["what", "changed"]


def test_encode_decode_round_trip_and_unknown_words():
    vocab = build_vocab([["the", "cube", "moved"]])
    assert list(vocab)[:4] == list(SPECIAL_TOKENS) and vocab["cube"] == 4
    ids, unknown = encode(tokenize("the cube moved"), vocab)
    assert ids[0] == 2 and ids[-1] == 3 and unknown == 0
    idx_to_word = {i: w for w, i in vocab.items()}
    assert decode(ids + [0, 0], idx_to_word) == "the cube moved"
    ids, unknown = encode(["the", "sphere"], vocab)
    assert unknown == 1 and ids[2] == SPECIAL_TOKENS["<UNK>"]


def test_label_file_round_trip(tiny_data):
    with open(tiny_data["vocab"]) as f:
        vocab = json.load(f)
    idx_to_word = {i: w for w, i in vocab.items()}
    assert [vocab[w] for w in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert list(vocab)[4:] == sorted(list(vocab)[4:])
    with open(tiny_data["change_captions"]) as f:
        change = json.load(f)
    with open(tiny_data["no_change_captions"]) as f:
        no_change = json.load(f)
    with h5py.File(tiny_data["h5"], "r") as h5:
        for prefix, captions in (("", change), ("neg_", no_change)):
            labels = h5[prefix + "labels"][()]
            start = h5[prefix + "label_start_idx"][()]
            end = h5[prefix + "label_end_idx"][()]
            length = h5[prefix + "label_length"][()]
            assert labels.dtype == np.int64 and len(start) == len(end) == 40
            for name, caps in captions.items():
                scene_id = int(name[-10:-4])
                rows = range(start[scene_id], end[scene_id] + 1)  # inclusive end
                assert len(rows) == len(caps)
                for row, cap in zip(rows, caps):
                    assert decode(labels[row], idx_to_word) == " ".join(tokenize(cap))
                    assert length[row] == len(tokenize(cap)) + 2
                    assert labels[row, length[row] - 1] == 3 and labels[row, 0] == 2
                    assert not labels[row, length[row]:].any()


def _write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture
def gap_data(tmp_path):
    """Images for ids 0, 1, 3 and 5 (2 and 4 missing); id 3 is a val id with a new word."""
    img = tmp_path / "images"
    img.mkdir()
    for i in (0, 1, 3, 5):
        (img / ("CLEVR_default_%06d.png" % i)).write_bytes(b"")
    caps = {"CLEVR_default_000000.png": ["the red cube moved", "the cube moved ."],
            "CLEVR_default_000001.png": ["the ball is missing"],
            "CLEVR_default_000003.png": ["the purple ball is gone"],
            "CLEVR_default_000005.png": ["the cube, moved"]}
    neg = {k: ["nothing has changed"] for k in caps}
    _write(tmp_path / "caps.json", caps)
    _write(tmp_path / "neg.json", neg)
    _write(tmp_path / "splits.json", {"train": [0, 1, 5], "val": [3], "test": []})
    args = [str(tmp_path / "caps.json"), str(tmp_path / "neg.json"), str(img),
            str(tmp_path / "splits.json"), str(tmp_path / "out" / "vocab.json"),
            str(tmp_path / "out" / "labels.h5")]
    return tmp_path, args


def test_ids_from_file_names_with_gaps(gap_data):
    tmp_path, args = gap_data
    stats = preprocess(*args)
    assert stats["unknown_words"] == 2  # "purple" and "gone" appear only in the val caption
    with open(args[4]) as f:
        vocab = json.load(f)
    assert "purple" not in vocab and "," in vocab
    with h5py.File(args[5], "r") as h5:
        assert list(h5["label_start_idx"]) == [0, 2, -1, 3, -1, 4]
        assert list(h5["label_end_idx"]) == [1, 2, -1, 3, -1, 4]
        assert list(h5["neg_label_start_idx"]) == [0, 1, -1, 2, -1, 3]
        assert h5["labels"].shape == (5, 7)  # "<START> the purple ball is gone <END>"
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_empty_caption_is_a_clear_error(gap_data, capsys):
    tmp_path, args = gap_data
    _write(tmp_path / "caps.json", {"CLEVR_default_000001.png": ["the ball moved", " . "]})
    with pytest.raises(PreprocessError, match="scene id 1"):
        preprocess(*args)
    flags = ["--input_captions_json", "--input_neg_captions_json", "--input_image_dir",
             "--split_json", "--output_vocab_json", "--output_h5"]
    with pytest.raises(SystemExit) as exit_info:
        main([x for pair in zip(flags, args) for x in pair])
    assert exit_info.value.code == 2
    assert "CLEVR_default_000001.png" in capsys.readouterr().err
    assert not os.path.exists(args[5])


def test_missing_image_folder(gap_data):
    _, args = gap_data
    args[2] = args[2] + "_nope"
    with pytest.raises(PreprocessError, match="images_nope does not exist"):
        preprocess(*args)
