"""Scenes of the synthetic CLEVR-Change generator: sampling objects, cameras and lights, one change.

make_scene() samples a "before" scene, applies one change (change_type_of() says which), jitters
the camera and light of the three images, renders them (render.py) until every object is clearly
visible, and captions the change (captions.py). Every scene draws from its own generator seeded
with (seed, scene id), so a scene does not depend on which process makes it.
"""
import math

import numpy as np

from utils.clevr_objects import COLORS, MATERIALS, SHAPES
from utils.synthetic.captions import change_captions, no_change_captions
from utils.synthetic.render import SIZES, SUPERSAMPLE, _boxes, _primary, _project, render
from utils.text import CHANGE_TYPES

IMAGE_DIRS = {"default": "images", "semantic": "sc_images", "nonsemantic": "nsc_images"}
IMAGE_NAMES = {"default": "CLEVR_default_%06d.png", "semantic": "CLEVR_semantic_%06d.png",
               "nonsemantic": "CLEVR_nonsemantic_%06d.png"}

ARENA = 3.0  # objects are placed with |x|, |y| <= ARENA
GAP = 0.15  # minimum free space between two objects
MIN_MOVE = 1.6  # a moved object travels at least this far, to be visible
MIN_VISIBLE = 0.0012  # an object must cover this fraction of the image (CLEVR: 200 px of 480x320)

BASE_CAMERA = {"azimuth": -50.0, "elevation": 32.0, "distance": 11.5, "fov": 46.0,
               "target": [0.0, 0.4]}
BASE_LIGHT = {"key_azimuth": -20.0, "key_elevation": 50.0, "key_intensity": 0.85,
              "fill_azimuth": 100.0, "fill_elevation": 35.0, "fill_intensity": 0.25,
              "ambient": 0.28}


def _jitter_camera(rng, scale):
    cam = dict(BASE_CAMERA)
    cam["azimuth"] += rng.uniform(-4.0, 4.0) * scale
    cam["elevation"] += rng.uniform(-2.0, 2.0) * scale
    cam["distance"] *= 1.0 + rng.uniform(-0.03, 0.03) * scale
    cam["target"] = [float(v + rng.uniform(-0.15, 0.15) * scale) for v in cam["target"]]
    return cam


def _jitter_light(rng, scale):
    def direction(az, el):
        az, el = math.radians(az), math.radians(el)
        return [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]

    b = BASE_LIGHT
    return {
        "key": direction(b["key_azimuth"] + rng.uniform(-35, 35) * scale,
                         b["key_elevation"] + rng.uniform(-12, 12) * scale),
        "fill": direction(b["fill_azimuth"] + rng.uniform(-20, 20) * scale, b["fill_elevation"]),
        "key_intensity": b["key_intensity"] * (1.0 + rng.uniform(-0.25, 0.25) * scale),
        "fill_intensity": b["fill_intensity"] * (1.0 + rng.uniform(-0.3, 0.3) * scale),
        "ambient": b["ambient"] * (1.0 + rng.uniform(-0.2, 0.2) * scale),
    }


def _random_attributes(rng):
    return {"shape": SHAPES[rng.integers(len(SHAPES))],
            "color": list(COLORS)[rng.integers(len(COLORS))],
            "material": MATERIALS[rng.integers(2)],
            "size": list(SIZES)[rng.integers(2)],
            "rotation": float(rng.uniform(0, math.pi / 2))}


def _free_position(rng, objects, size, skip=None, away_from=None):
    """A position where an object of ``size`` overlaps nothing (None after many tries)."""
    r = SIZES[size]
    for _ in range(200):
        pos = rng.uniform(-ARENA, ARENA, 2)
        if away_from is not None and np.hypot(*(pos - away_from)) < MIN_MOVE:
            continue
        if all(np.hypot(*(pos - np.array(o["position"]))) >= r + SIZES[o["size"]] + GAP
               for k, o in enumerate(objects) if k != skip):
            return [float(pos[0]), float(pos[1])]
    return None


def _sample_objects(rng, count):
    objects = []
    while len(objects) < count:
        obj = _random_attributes(rng)
        pos = _free_position(rng, objects, obj["size"])
        if pos is None:
            return None
        obj["position"] = pos
        objects.append(obj)
    return objects


def _apply_change(rng, change, before):
    """(after objects, index of the changed object in the union list, details) or None."""
    after = [dict(o) for o in before]
    if change == "add":
        obj = _random_attributes(rng)
        obj["position"] = _free_position(rng, before, obj["size"])
        if obj["position"] is None:
            return None
        after.append(obj)
        return after, len(before), {}
    k = int(rng.integers(len(before)))
    if change == "drop":
        del after[k]
        return after, k, {}
    if change == "color":
        new = [c for c in COLORS if c != before[k]["color"]][rng.integers(len(COLORS) - 1)]
        after[k]["color"] = new
        return after, k, {"before": before[k]["color"], "after": new}
    if change == "material":
        new = "metal" if before[k]["material"] == "rubber" else "rubber"
        after[k]["material"] = new
        return after, k, {"before": before[k]["material"], "after": new}
    pos = _free_position(rng, before, before[k]["size"], skip=k,
                         away_from=np.array(before[k]["position"]))
    if pos is None:
        return None
    after[k]["position"] = pos
    return after, k, {"before": before[k]["position"], "after": pos}


def change_type_of(scene_id, num_scenes, start_id=0):
    """Change type of an id: type k owns the k-th fifth of the ids, as in the real data."""
    block = (scene_id - start_id) * len(CHANGE_TYPES) // num_scenes
    return CHANGE_TYPES[block]


def _with_view(objects, camera, width, height):
    """Objects plus their camera-space x and depth (for spatial relations)."""
    centres = np.array([[*o["position"], SIZES[o["size"]]] for o in objects])
    _, cam_x, depth = _project(centres, camera, width, height)
    return [dict(o, cam_x=float(x), depth=float(z)) for o, x, z in zip(objects, cam_x, depth)]


def _well_visible(box, share, width, height):
    return (share >= MIN_VISIBLE and box[0] > 0 and box[1] > 0 and box[2] < width - 1
            and box[3] < height - 1)


def _layout_ok(boxes, change, target_k, width, height):
    """Every object clearly visible before the change, and the changed object after it.

    ``boxes`` maps "default" and "semantic" to (boxes, shares) of the objects of that image.
    """
    view_boxes, shares = boxes["default"]
    if not all(_well_visible(b, sh, width, height) for b, sh in zip(view_boxes, shares)):
        return False
    if change == "drop":
        return True
    view_boxes, shares = boxes["semantic"]
    k = len(view_boxes) - 1 if change == "add" else target_k
    return _well_visible(view_boxes[k], shares[k], width, height)


def make_scene(scene_id, change, seed, width, height, supersample=SUPERSAMPLE, viewpoint_shift=1.0):
    """Sample and render one triplet; returns (images dict, record dict).

    viewpoint_shift scales the camera and light jitter of the changed and the distractor image
    (1.0: the default; 0: the same camera and light as the "before" image, up to its own jitter).
    """
    rng = np.random.default_rng([seed, scene_id])
    lo, hi = {"add": (3, 5), "drop": (4, 6)}.get(change, (3, 6))
    for _ in range(100):
        before = _sample_objects(rng, int(rng.integers(lo, hi + 1)))
        if before is None:
            continue
        changed = _apply_change(rng, change, before)
        if changed is None:
            continue
        after, target_k, details = changed
        cameras = {"default": _jitter_camera(rng, 0.5), "semantic": _jitter_camera(rng, viewpoint_shift),
                   "nonsemantic": _jitter_camera(rng, viewpoint_shift)}
        lights = {"default": _jitter_light(rng, 0.3), "semantic": _jitter_light(rng, viewpoint_shift),
                  "nonsemantic": _jitter_light(rng, viewpoint_shift)}
        # The union list: "before" objects, then the added one (add); after-attributes live in
        # the change record.
        union = before + ([after[-1]] if change == "add" else [])
        views = {"default": before, "nonsemantic": before, "semantic": after}
        # Cheap check first (object indices at one ray per pixel), then the full renders.
        checks = {name: _boxes(_primary(views[name], cameras[name], width, height, False)[3]
                               .reshape(height, width), len(views[name]), 1)
                  for name in ("default", "semantic")}
        if not _layout_ok(checks, change, target_k, width, height):
            continue
        images, boxes = {}, {}
        for name in ("default", "semantic", "nonsemantic"):
            images[name], index_map = render(views[name], cameras[name], lights[name], width,
                                             height, supersample)
            boxes[name] = _boxes(index_map, len(views[name]), supersample)
        if _layout_ok(boxes, change, target_k, width, height):
            break
    else:
        raise RuntimeError(f"scene {scene_id}: no valid layout after 100 tries")

    describe_in = _with_view(after if change == "add" else before, cameras["default"],
                             width, height)
    caption_rng = np.random.default_rng([seed, scene_id, 1])
    captions = change_captions(caption_rng, change, target_k, describe_in, details)
    negatives = no_change_captions(caption_rng)
    boxes = {name: view_boxes for name, (view_boxes, _) in boxes.items()}
    # Boxes of the union list: None where the object is absent from an image.
    if change == "drop":
        boxes["semantic"].insert(target_k, None)
    if change == "add":
        boxes["default"].append(None)
        boxes["nonsemantic"].append(None)
    objects = []
    for k, obj in enumerate(union):
        entry = {key: obj[key] for key in ("shape", "color", "material", "size", "position",
                                           "rotation")}
        entry["boxes"] = {name: boxes[name][k] for name in boxes}
        objects.append(entry)
    record = {
        "image_id": scene_id,
        "images": {name: IMAGE_NAMES[name] % scene_id for name in IMAGE_NAMES},
        "change_type": change,
        "changed_object": target_k,
        "change": details,
        "objects": objects,
        "cameras": cameras,
        "lights": lights,
        "captions": captions,
        "no_change_captions": negatives,
    }
    return images, record
