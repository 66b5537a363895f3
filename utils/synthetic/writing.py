"""Writing a synthetic CLEVR-Change data set: the images (in worker processes), the index files, a preview.

generate() writes the layout of DATA.md section 1 plus scenes.json with the ground truth of every
scene; the images come out byte for byte the same whatever the number of worker processes.
"""
import json
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.eval_utils import build_references
from utils.fileio import write_json_atomic
from utils.object_score import SCENES_FILE
from utils.synthetic.render import SUPERSAMPLE
from utils.synthetic.scenes import IMAGE_DIRS, IMAGE_NAMES, change_type_of, make_scene
from utils.text import CHANGE_TYPES


def _save_png(image, path):
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _work(job):
    scene_id, change, seed, width, height, out_dir, supersample, viewpoint_shift = job
    images, record = make_scene(scene_id, change, seed, width, height, supersample, viewpoint_shift)
    for name, image in images.items():
        _save_png(image, os.path.join(out_dir, IMAGE_DIRS[name], IMAGE_NAMES[name] % scene_id))
    return record


def make_splits(ids, seed):
    """About 85 / 5 / 10 percent of the ids, shuffled with the seed, each list sorted."""
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(ids))
    n_train = int(round(0.85 * len(ids)))
    n_val = int(round(0.05 * len(ids)))
    pick = lambda sl: sorted(int(ids[i]) for i in order[sl])  # noqa: E731
    return {"train": pick(slice(0, n_train)), "val": pick(slice(n_train, n_train + n_val)),
            "test": pick(slice(n_train + n_val, None))}


def write_index(records, out_dir, seed):
    records = sorted(records, key=lambda r: r["image_id"])
    ids = [r["image_id"] for r in records]
    change = {IMAGE_NAMES["default"] % r["image_id"]: r["captions"] for r in records}
    no_change = {IMAGE_NAMES["default"] % r["image_id"]: r["no_change_captions"] for r in records}
    type_mapping = {t: [] for t in CHANGE_TYPES}
    for r in records:
        type_mapping[r["change_type"]].append("%06d.png" % r["image_id"])
    coco = build_references(change, no_change, "synthetic CLEVR-Change captions (change and no-change)")
    scenes = {"scenes": [{k: v for k, v in r.items()
                          if k not in ("captions", "no_change_captions")} for r in records]}
    write_json_atomic(os.path.join(out_dir, "change_captions.json"), change, indent=None)
    write_json_atomic(os.path.join(out_dir, "no_change_captions.json"), no_change, indent=None)
    write_json_atomic(os.path.join(out_dir, "splits.json"), make_splits(ids, seed), indent=None)
    write_json_atomic(os.path.join(out_dir, "type_mapping.json"), type_mapping, indent=None)
    write_json_atomic(os.path.join(out_dir, "total_change_captions_reformat.json"), coco, indent=None)
    write_json_atomic(os.path.join(out_dir, SCENES_FILE), scenes, indent=None)


def generate(output_dir, num_scenes, seed=0, width=480, height=320, workers=None, start_id=0,
             supersample=SUPERSAMPLE, progress=True, viewpoint_shift=1.0):
    """Render ``num_scenes`` triplets and write every index file; returns the scene records."""
    if num_scenes < len(CHANGE_TYPES):
        raise ValueError(f"--num_scenes must be at least {len(CHANGE_TYPES)} (one per change "
                         f"type); got {num_scenes}")
    for sub in IMAGE_DIRS.values():
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    if viewpoint_shift < 0:
        raise ValueError(f"--viewpoint_shift must be at least 0; got {viewpoint_shift}")
    jobs = [(start_id + i, change_type_of(start_id + i, num_scenes, start_id), seed, width,
             height, output_dir, supersample, viewpoint_shift) for i in range(num_scenes)]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=num_scenes, desc="scenes", unit="scene", disable=not progress)
    records = []
    if workers == 1:
        for job in jobs:
            records.append(_work(job))
            bar.update()
    else:
        with Pool(workers) as pool:
            for record in pool.imap_unordered(_work, jobs, chunksize=4):
                records.append(record)
                bar.update()
    bar.close()
    write_index(records, output_dir, seed)
    return records


def preview(output_dir, path, ids, max_width=960):
    """A PNG sheet of triplets (before | semantic | distractor) with their first caption."""
    from PIL import ImageDraw

    with open(os.path.join(output_dir, "change_captions.json")) as f:
        captions = json.load(f)
    rows = []
    for scene_id in ids:
        tiles = [Image.open(os.path.join(output_dir, IMAGE_DIRS[n], IMAGE_NAMES[n] % scene_id))
                 .convert("RGB") for n in ("default", "semantic", "nonsemantic")]
        w, h = tiles[0].size
        row = Image.new("RGB", (3 * w + 8, h + 22), "white")
        for i, tile in enumerate(tiles):
            row.paste(tile, (i * (w + 4), 0))
        text = f"{scene_id}: {captions[IMAGE_NAMES['default'] % scene_id][0]}"
        ImageDraw.Draw(row).text((4, h + 5), text, fill="black")
        rows.append(row)
    width = max(r.size[0] for r in rows)
    sheet = Image.new("RGB", (width, sum(r.size[1] for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.size[1]
    if sheet.size[0] > max_width:
        scale = max_width / sheet.size[0]
        sheet = sheet.resize((max_width, round(sheet.size[1] * scale)), Image.LANCZOS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
