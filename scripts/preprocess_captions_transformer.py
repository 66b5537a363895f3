"""Builds the vocabulary json and the caption label h5 file (DATA.md section 1, "Labels").

    python scripts/preprocess_captions_transformer.py --input_captions_json ./data/change_captions.json \
        --input_neg_captions_json ./data/no_change_captions.json --input_image_dir ./data/images \
        --split_json ./data/splits.json --output_vocab_json ./data/transformer_vocab.json \
        --output_h5 ./data/transformer_labels.h5

Scene ids come from the numbers in the image file names of --input_image_dir, so gaps in the
ids are kept: rows of ``label_start_idx`` / ``label_end_idx`` are indexed by scene id, with -1
where an id has no captions. End indices are inclusive.
"""
import argparse
import json
import os
import re
import sys

import h5py
import numpy as np

from utils.cli import int_at_least
from utils.dataset import H5_KEYS, DataError, check_splits
from utils.errors import UserError
from utils.fileio import files_by_id, read_json
from utils.text import build_vocab, encode, tokenize


class PreprocessError(UserError):
    """Input that cannot be turned into labels; the message names the file and the fix."""


_ID = re.compile(r"(\d+)\.png$")


def image_ids(image_dir):
    """{scene id: file name} for the PNG files of ``image_dir`` (id = number in the name)."""
    if not os.path.isdir(image_dir):
        raise PreprocessError(f"image folder {image_dir} does not exist; unpack the data "
                              f"(tar -xzf clevr_change.tar.gz) or generate it with "
                              f"scripts/generate_synthetic_clevr.py")
    ids = files_by_id(image_dir, _ID)
    if not ids:
        raise PreprocessError(f"no PNG images with a number in their name in {image_dir}")
    return ids


def _load_json(path, what):
    return read_json(path, f"{what} file", error=PreprocessError)


def _tokenized_captions(captions, ids, path):
    """{id: [token lists]} for the ids that have captions in ``captions`` (keyed by file name)."""
    if not isinstance(captions, dict):
        raise PreprocessError(f"{path} must map image file names to lists of captions, e.g. "
                              f'{{"CLEVR_default_000123.png": ["the cube moved", ...]}}')
    by_id = {}
    for scene_id, name in ids.items():
        if name not in captions:
            continue
        caps = captions[name]
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not all(isinstance(cap, str) for cap in caps):
            raise PreprocessError(f"{path}: the captions of {name} (scene id {scene_id}) must be a list of "
                                  f"strings, got {json.dumps(caps)[:80]}; fix or remove that entry")
        token_lists = []
        for cap in caps:
            tokens = tokenize(cap)
            if not tokens:
                raise PreprocessError(f"{path}: an empty caption for {name} (scene id "
                                      f"{scene_id}); remove it or write the caption")
            token_lists.append(tokens)
        if not token_lists:
            raise PreprocessError(f"{path}: {name} (scene id {scene_id}) has an empty caption "
                                  f"list; remove the key or add captions")
        by_id[scene_id] = token_lists
    return by_id


def _encode_all(by_id, vocab, max_id):
    """labels (M, Lmax), start (max_id+1,), end (inclusive), length (M,), unknown-word count."""
    encoded, lengths, unknown = [], [], 0
    start = np.full(max_id + 1, -1, dtype=np.int64)
    end = np.full(max_id + 1, -1, dtype=np.int64)
    for scene_id in sorted(by_id):
        start[scene_id] = len(encoded)
        for tokens in by_id[scene_id]:
            ids, unk = encode(tokens, vocab)
            unknown += unk
            encoded.append(ids)
            lengths.append(len(ids))
        end[scene_id] = len(encoded) - 1
    width = max(lengths) if lengths else 2
    labels = np.zeros((len(encoded), width), dtype=np.int64)
    for row, ids in enumerate(encoded):
        labels[row, :len(ids)] = ids
    return labels, start, end, np.array(lengths, dtype=np.int64), unknown


def preprocess(captions_json, neg_captions_json, image_dir, split_json, vocab_json, output_h5,
               word_count_threshold=0):
    """Writes the vocab json and the h5; returns a dict of counts for the report."""
    ids = image_ids(image_dir)
    captions = _load_json(captions_json, "change-caption")
    neg_captions = _load_json(neg_captions_json, "no-change-caption")
    splits = _load_json(split_json, "split")
    try:
        check_splits(splits, split_json)
    except DataError as err:
        raise PreprocessError(str(err)) from None
    if "train" not in splits:
        raise PreprocessError(f"{split_json} has no 'train' list; the vocabulary is built from "
                              f"the train split")
    pos = _tokenized_captions(captions, ids, captions_json)
    neg = _tokenized_captions(neg_captions, ids, neg_captions_json)
    if not pos:
        raise PreprocessError(f"no caption key of {captions_json} matches an image file name "
                              f"of {image_dir} (keys look like CLEVR_default_000123.png)")

    # Vocabulary from train-split captions only (change and no-change).
    train = [i for i in splits["train"] if i in pos or i in neg]
    counts = {}
    for scene_id in train:
        for tokens in pos.get(scene_id, []) + neg.get(scene_id, []):
            for word in tokens:
                counts[word] = counts.get(word, 0) + 1
    vocab = build_vocab([[w for w, c in counts.items() if c > word_count_threshold]])

    max_id = max(ids)
    labels, start, end, length, unk_pos = _encode_all(pos, vocab, max_id)
    neg_labels, neg_start, neg_end, neg_length, unk_neg = _encode_all(neg, vocab, max_id)

    for path in (vocab_json, output_h5):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = output_h5 + ".tmp"
    with h5py.File(tmp, "w") as f:
        for key, array in zip(H5_KEYS, (labels, start, end, length, neg_labels, neg_start, neg_end, neg_length)):
            f.create_dataset(key, data=array)
    os.replace(tmp, output_h5)
    tmp = vocab_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(vocab, f)
    os.replace(tmp, vocab_json)
    return {"vocab_size": len(vocab), "ids": len(ids), "captions": len(labels),
            "neg_captions": len(neg_labels), "max_length": max(labels.shape[1],
                                                                 neg_labels.shape[1]),
            "unknown_words": unk_pos + unk_neg}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input_captions_json", required=True)
    parser.add_argument("--input_neg_captions_json", required=True)
    parser.add_argument("--input_image_dir", required=True)
    parser.add_argument("--split_json", required=True)
    parser.add_argument("--output_vocab_json", required=True)
    parser.add_argument("--output_h5", required=True)
    parser.add_argument("--word_count_threshold", type=int_at_least(0), default=0,
                        help="keep train words seen more than this many times; others -> <UNK>")
    args = parser.parse_args(argv)
    try:
        stats = preprocess(args.input_captions_json, args.input_neg_captions_json,
                           args.input_image_dir, args.split_json, args.output_vocab_json,
                           args.output_h5, args.word_count_threshold)
    except PreprocessError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"vocabulary: {stats['vocab_size']} tokens -> {args.output_vocab_json}")
    print(f"labels: {stats['captions']} change and {stats['neg_captions']} no-change captions "
          f"over {stats['ids']} images, longest {stats['max_length']} tokens with <START>/<END> "
          f"-> {args.output_h5}")
    print(f"words outside the vocabulary (mapped to <UNK>): {stats['unknown_words']}")


if __name__ == "__main__":
    main()
