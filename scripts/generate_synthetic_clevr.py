"""Synthetic CLEVR-Change: renders (before, semantic change, distractor) triplets with numpy.

Writes the layout of DATA.md section 1 under --output_dir (images/, sc_images/, nsc_images/,
change_captions.json, no_change_captions.json, splits.json, type_mapping.json,
total_change_captions_reformat.json) plus scenes.json with the ground truth of every scene.

Rendering is a small ray caster vectorised over pixels: a ground plane, spheres, cubes and
cylinders, Lambert + Blinn-Phong shading, a shadow ray towards the key light, and a cheap
environment reflection on metal. Every scene draws from its own generator seeded with
(seed, scene id), so the output bytes do not depend on the number of worker processes.

    python scripts/generate_synthetic_clevr.py --output_dir data/synthetic --num_scenes 2000 \
        --width 160 --height 120
"""
import argparse
import json
import math
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.clevr_objects import (ATTRIBUTES, COLORS, MATERIAL_WORDS, MATERIALS, NOUN_WORDS, SHAPE_WORDS,
                                 SHAPES, SIZE_WORDS)
from utils.eval_utils import build_references
from utils.fileio import write_json_atomic
from utils.text import CHANGE_TYPES

SIZES = {"large": 0.7, "small": 0.35}  # CLEVR's object "radius" in world units

IMAGE_DIRS = {"default": "images", "semantic": "sc_images", "nonsemantic": "nsc_images"}
IMAGE_NAMES = {"default": "CLEVR_default_%06d.png", "semantic": "CLEVR_semantic_%06d.png",
               "nonsemantic": "CLEVR_nonsemantic_%06d.png"}

ARENA = 3.0  # objects are placed with |x|, |y| <= ARENA
GAP = 0.15  # minimum free space between two objects
MIN_MOVE = 1.6  # a moved object travels at least this far, to be visible
MIN_VISIBLE = 0.0012  # an object must cover this fraction of the image (CLEVR: 200 px of 480x320)
RELATION_MARGIN = 0.6  # spatial relations are only used when this clear, so jitter cannot flip them
MAX_TOKENS = 22  # longest caption in words: 24 with <START>/<END> = model.speaker.seq_length

GROUND_ALBEDO = 0.60
SKY = 0.62
SUPERSAMPLE = 2  # rays per pixel along each axis (anti-aliasing)


# ----------------------------------------------------------------------------------------
# Geometry
def _normalize(v):
    if v.ndim == 1:
        return v / math.sqrt(float(v @ v))
    return v / np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]


def _intersect(obj, origins, dirs, need_normal=True):
    """Ray hits of one object: distances t (inf where missed) and unit normals.

    ``origins`` and ``dirs`` broadcast to (P, 3): primary rays share an origin, shadow rays share
    a direction.
    """
    cx, cy = obj["position"]
    r = SIZES[obj["size"]]
    o = origins - np.array([cx, cy, 0.0])
    o, d = np.broadcast_arrays(o, dirs)
    n_rays = o.shape[0]
    t = np.full(n_rays, np.inf)
    normal = np.zeros((n_rays, 3)) if need_normal else None
    if obj["shape"] == "sphere":
        oc = o - np.array([0.0, 0.0, r])
        b = np.einsum("ij,ij->i", oc, d)
        c = np.einsum("ij,ij->i", oc, oc) - r * r
        disc = b * b - c
        hit = disc > 0
        th = -b[hit] - np.sqrt(disc[hit])
        ok = th > 1e-6
        idx = np.flatnonzero(hit)[ok]
        t[idx] = th[ok]
        if need_normal:
            normal[idx] = (oc[idx] + th[ok, None] * d[idx]) / r
    elif obj["shape"] == "cube":
        h = r / math.sqrt(2.0)  # CLEVR shrinks cubes so that their footprint matches
        cos, sin = math.cos(obj["rotation"]), math.sin(obj["rotation"])
        rot = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])  # world -> local
        lo = (o - np.array([0.0, 0.0, h])) @ rot.T
        ld = d @ rot.T
        safe = np.where(np.abs(ld) < 1e-12, 1e-12, ld)
        t1 = (-h - lo) / safe
        t2 = (h - lo) / safe
        tnear = np.minimum(t1, t2)
        tfar = np.maximum(t1, t2)
        tmin = tnear.max(axis=1)
        tmax = tfar.min(axis=1)
        hit = (tmax >= tmin) & (tmin > 1e-6)
        t[hit] = tmin[hit]
        if need_normal:
            axis = tnear.argmax(axis=1)
            local = np.zeros((n_rays, 3))
            rows = np.arange(n_rays)
            local[rows, axis] = -np.sign(ld[rows, axis])
            normal[hit] = local[hit] @ rot  # local -> world
    else:  # cylinder standing on the ground, radius r, height 2r
        a = d[:, 0] ** 2 + d[:, 1] ** 2
        b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
        c = o[:, 0] ** 2 + o[:, 1] ** 2 - r * r
        disc = b * b - a * c
        hit = (disc > 0) & (a > 1e-12)
        side = np.full(n_rays, np.inf)
        ts = (-b[hit] - np.sqrt(disc[hit])) / a[hit]
        z = o[hit, 2] + ts * d[hit, 2]
        ok = (ts > 1e-6) & (z >= 0) & (z <= 2 * r)
        side[np.flatnonzero(hit)[ok]] = ts[ok]
        cap = np.full(n_rays, np.inf)
        down = np.abs(d[:, 2]) > 1e-12
        tc = (2 * r - o[down, 2]) / d[down, 2]
        px = o[down, 0] + tc * d[down, 0]
        py = o[down, 1] + tc * d[down, 1]
        ok = (tc > 1e-6) & (px * px + py * py <= r * r)
        cap[np.flatnonzero(down)[ok]] = tc[ok]
        t = np.minimum(side, cap)
        if need_normal:
            on_side = side < cap
            ps = o[on_side] + side[on_side, None] * d[on_side]
            normal[on_side, 0] = ps[:, 0] / r
            normal[on_side, 1] = ps[:, 1] / r
            normal[np.isfinite(cap) & ~on_side, 2] = 1.0
    return t, normal


def _bounding_sphere(obj):
    r = SIZES[obj["size"]]
    # Every shape fits in a sphere of radius r * sqrt(2) around (x, y, r).
    return np.array([obj["position"][0], obj["position"][1], r]), r * 1.42


def _hits(obj, origins, dirs, need_normal=True, origins_sq=None):
    """Like ``_intersect``, but only rays passing the object's bounding sphere are traced.

    Either the origins (camera rays) or the direction (shadow rays) is shared, which turns the
    culling test into matrix-vector products. ``origins_sq`` caches |origin|^2 of shadow rays.
    """
    centre, radius = _bounding_sphere(obj)
    if origins.ndim == 1:
        oc = centre - origins
        along = dirs @ oc
        dist2 = oc @ oc - along * along
    else:
        along = centre @ dirs - origins @ dirs
        if origins_sq is None:
            origins_sq = np.einsum("ij,ij->i", origins, origins)
        oc2 = centre @ centre - 2.0 * (origins @ centre) + origins_sq
        dist2 = oc2 - along * along
    cand = np.flatnonzero((dist2 <= radius * radius) & (along > -radius))
    n_rays = dirs.shape[0] if dirs.ndim == 2 else origins.shape[0]
    t = np.full(n_rays, np.inf)
    normal = np.zeros((n_rays, 3)) if need_normal else None
    if cand.size:
        o = origins if origins.ndim == 1 else origins[cand]
        d = dirs if dirs.ndim == 1 else dirs[cand]
        o, d = np.broadcast_arrays(o, d)
        tc, nc = _intersect(obj, o, d, need_normal)
        t[cand] = tc
        if need_normal:
            normal[cand] = nc
    return t, normal


def _camera_basis(camera):
    az, el = math.radians(camera["azimuth"]), math.radians(camera["elevation"])
    target = np.array(camera["target"] + [0.0])
    eye = target + camera["distance"] * np.array(
        [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = _normalize(target - eye)
    right = _normalize(np.cross(forward, [0.0, 0.0, 1.0]))
    up = np.cross(right, forward)
    return eye, forward, right, up


def _project(points, camera, width, height):
    """World points (K, 3) -> pixel coordinates (K, 2) and camera-space (x right, depth)."""
    eye, forward, right, up = _camera_basis(camera)
    rel = points - eye
    depth = rel @ forward
    f = 0.5 * width / math.tan(math.radians(camera["fov"]) / 2)
    u = width / 2 + f * (rel @ right) / depth
    v = height / 2 - f * (rel @ up) / depth
    return np.stack([u, v], axis=1), rel @ right, depth


def _primary(objects, camera, width, height, need_normal=True):
    """Camera rays of every pixel: eye, dirs, hit distance, object index (-1 ground), normal."""
    eye, forward, right, up = _camera_basis(camera)
    f = 0.5 * width / math.tan(math.radians(camera["fov"]) / 2)
    vv, uu = np.mgrid[0:height, 0:width]
    x = (uu.ravel() + 0.5 - width / 2) / f
    y = -(vv.ravel() + 0.5 - height / 2) / f
    dirs = _normalize(forward + x[:, None] * right + y[:, None] * up)
    n_rays = dirs.shape[0]
    t_best = np.full(n_rays, np.inf)
    index = np.full(n_rays, -1)
    normal = np.zeros((n_rays, 3)) if need_normal else None
    below = dirs[:, 2] < -1e-9
    t_best[below] = -eye[2] / dirs[below, 2]
    if need_normal:
        normal[:, 2] = 1.0
    for k, obj in enumerate(objects):
        rays = _screen_rect(obj, camera, width, height)
        if rays.size == 0:
            continue
        t, nrm = _hits(obj, eye, dirs[rays], need_normal)
        closer = t < t_best[rays]
        rays = rays[closer]
        t_best[rays] = t[closer]
        index[rays] = k
        if need_normal:
            normal[rays] = nrm[closer]
    return eye, dirs, t_best, index, normal


def _screen_rect(obj, camera, width, height):
    """Pixel indices of the screen rectangle that holds the object's bounding sphere."""
    centre, radius = _bounding_sphere(obj)
    corners = centre + radius * np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1)
                                          for k in (-1, 1)], dtype=float)
    uv, _, depth = _project(corners, camera, width, height)
    if (depth <= 0).any():  # behind the camera: test every pixel
        return np.arange(width * height)
    u0, v0 = np.clip(np.floor(uv.min(axis=0)).astype(int), 0, [width, height])
    u1, v1 = np.clip(np.ceil(uv.max(axis=0)).astype(int) + 1, 0, [width, height])
    rows, cols = np.arange(v0, v1), np.arange(u0, u1)
    return (rows[:, None] * width + cols[None, :]).ravel()


def render(objects, camera, light, width, height, supersample=SUPERSAMPLE):
    """Render one image: (H, W, 3) uint8 and the object index of every pixel (-1: ground).

    The index map is at the supersampled resolution (H*s, W*s).
    """
    s = supersample
    hs, ws = height * s, width * s
    eye, dirs, t_best, index, normal = _primary(objects, camera, ws, hs)
    n_rays = dirs.shape[0]
    hit = np.isfinite(t_best)
    albedo = np.full((n_rays, 3), GROUND_ALBEDO)
    metal = np.zeros(n_rays, dtype=bool)
    for k, obj in enumerate(objects):
        mine = index == k
        albedo[mine] = np.array(COLORS[obj["color"]]) / 255.0
        metal[mine] = obj["material"] == "metal"

    points = eye + np.where(hit, t_best, 0.0)[:, None] * dirs
    key = _normalize(np.array(light["key"]))
    fill = _normalize(np.array(light["fill"]))
    lambert = np.clip(normal @ key, 0.0, None)

    # Shadow rays towards the key light from every lit point.
    lit = np.flatnonzero(hit & (lambert > 0))
    shadow = np.ones(n_rays)
    if lit.size:
        origins = points[lit] + 1e-4 * normal[lit]
        blocked = np.zeros(lit.size, dtype=bool)
        origins_sq = np.einsum("ij,ij->i", origins, origins)
        for obj in objects:
            t, _ = _hits(obj, origins, key, need_normal=False, origins_sq=origins_sq)
            blocked |= np.isfinite(t)
        shadow[lit[blocked]] = 0.0

    # Ground brightness falls off away from the centre, like CLEVR's curved backdrop.
    ground = index == -1
    falloff = np.ones(n_rays)
    dist2 = points[ground, 0] ** 2 + points[ground, 1] ** 2
    falloff[ground] = 0.75 + 0.25 * np.exp(-dist2 / 60.0)

    diffuse = (light["ambient"] + light["key_intensity"] * lambert * shadow
               + light["fill_intensity"] * np.clip(normal @ fill, 0.0, None))
    half = _normalize(key - dirs)
    spec_angle = np.clip(np.einsum("ij,ij->i", normal, half), 0.0, 1.0)
    shininess = np.where(metal, 80.0, 12.0)
    strength = np.where(metal, 1.6, np.where(ground, 0.03, 0.08))
    specular = strength * spec_angle ** shininess * shadow * light["key_intensity"]

    # Metal: darker diffuse plus a blurry reflection of a grey world (ground below, sky above).
    reflect = dirs - 2.0 * np.einsum("ij,ij->i", dirs, normal)[:, None] * normal
    # The grey world is dark below, bright near the horizon: flat metal faces then look either
    # dark or bright, which sets them clearly apart from evenly lit rubber.
    env = np.interp(reflect[:, 2], [-1.0, -0.35, -0.05, 0.1, 1.0], [0.12, 0.2, 0.9, 1.25, 0.95])
    rgb = albedo * diffuse[:, None]
    rgb[metal] = albedo[metal] * (0.15 * diffuse[metal, None] + env[metal, None])
    rgb = rgb * np.where(ground, falloff, 1.0)[:, None] + specular[:, None]
    rgb[~hit] = SKY
    rgb = np.clip(rgb, 0.0, 1.0).reshape(hs, ws, 3)
    rgb = rgb.reshape(height, s, width, s, 3).mean(axis=(1, 3))
    image = np.round(rgb * 255.0).astype(np.uint8)
    return image, index.reshape(hs, ws)


def _boxes(index_map, n_objects, supersample):
    """Visible 2D box [x0, y0, x1, y1] (pixels, inclusive) and pixel share of every object."""
    boxes, shares = [], []
    total = index_map.size
    for k in range(n_objects):
        rows, cols = np.nonzero(index_map == k)
        if rows.size == 0:
            boxes.append(None)
            shares.append(0.0)
            continue
        boxes.append([int(cols.min() // supersample), int(rows.min() // supersample),
                      int(cols.max() // supersample), int(rows.max() // supersample)])
        shares.append(rows.size / total)
    return boxes, shares


# ----------------------------------------------------------------------------------------
# Scenes
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


# ----------------------------------------------------------------------------------------
# Captions (only the 72 words of the real vocabulary; the attribute words: utils/clevr_objects.py)
RELATIONS = ("in front of", "behind", "on the left side of", "on the right side of")

CHANGE_TEMPLATES = {
    "color": ("{obj} turned {new}", "{obj} became {new}", "{obj} changed to {new}",
              "{obj} has changed to {new}", "{obj} was changed to {new}", "{obj} was made {new}"),
    "material": ("{obj} turned {new}", "{obj} became {new}", "{obj} changed to {new}",
                 "{obj} has changed to {new}", "{obj} was changed to {new}",
                 "{obj} was made {new}"),
    "add": ("{obj} has been added", "{obj} has been newly placed", "{obj} appeared",
            "{obj} has appeared", "{obj} was added", "there is {obj} newly placed"),
    "drop": ("{obj} is missing", "{obj} disappeared", "{obj} has disappeared", "{obj} is gone",
             "{obj} is no longer there"),
    "move": ("{obj} moved", "{obj} has moved", "{obj} changed its location",
             "{obj} has changed its location", "{obj} is in a different location",
             "{obj} was moved to a different location"),
}
NO_CHANGE_CAPTIONS = (
    "nothing has changed", "nothing changed", "nothing was modified", "nothing has been modified",
    "the two scenes seem identical", "the scenes seem identical", "the two scenes seem the same",
    "the scene remains the same", "the scene is the same as before", "no change was made",
    "no change has been made", "no change has occurred", "there is no change",
    "there is no difference", "no change occurred",
)
CAPTIONS_PER_PAIR = 6


def _matches(obj, target, attrs):
    return all(obj[a] == target[a] for a in attrs)


def _attribute_sets():
    sets = []
    for mask in range(1, 16):
        sets.append(tuple(a for i, a in enumerate(ATTRIBUTES) if mask >> i & 1))
    return sets


ATTRIBUTE_SETS = _attribute_sets()


def _phrase(rng, obj, attrs):
    words = []
    if "size" in attrs:
        words.append(SIZE_WORDS[obj["size"]][rng.integers(2)])
    if "color" in attrs:
        words.append(obj["color"])
    if "material" in attrs:
        options = MATERIAL_WORDS[obj["material"]]
        words.append(options[rng.integers(len(options))])
    if "shape" in attrs:
        options = SHAPE_WORDS[obj["shape"]]
        words.append(options[rng.integers(len(options))])
    else:
        words.append(NOUN_WORDS[rng.integers(2)])
    return " ".join(words)


def _relation_holds(rel, target, landmark):
    """Relation of two objects in the camera view (x: right, depth: away)."""
    if rel == "in front of":
        return target["depth"] < landmark["depth"] - RELATION_MARGIN
    if rel == "behind":
        return target["depth"] > landmark["depth"] + RELATION_MARGIN
    if rel == "on the left side of":
        return target["cam_x"] < landmark["cam_x"] - RELATION_MARGIN
    return target["cam_x"] > landmark["cam_x"] + RELATION_MARGIN


def _describe(rng, target_k, scene, force_relation=False):
    """A referring expression (without article) for ``scene[target_k]``.

    Prefers attribute subsets that single the object out in ``scene``; adds a spatial relation
    sometimes, or when attributes alone cannot tell it apart from a twin.
    """
    target = scene[target_k]
    others = [o for k, o in enumerate(scene) if k != target_k]
    unique = [a for a in ATTRIBUTE_SETS if not any(_matches(o, target, a) for o in others)]
    if unique and not force_relation and rng.random() >= 0.25:
        return _phrase(rng, target, unique[rng.integers(len(unique))])
    # Relation "<target> that is <rel> the <landmark>"; the landmark is described uniquely and
    # the relation must separate the target from every object sharing its description.
    attrs = unique[rng.integers(len(unique))] if unique else ATTRIBUTES
    rivals = [o for o in others if _matches(o, target, attrs)]
    options = []
    for lk, landmark in enumerate(scene):
        if lk == target_k:
            continue
        l_unique = [a for a in ATTRIBUTE_SETS
                    if not any(_matches(o, landmark, a) for j, o in enumerate(scene) if j != lk)]
        if not l_unique:
            continue
        for rel in RELATIONS:
            if _relation_holds(rel, target, landmark) and not any(
                    _relation_holds(rel, o, landmark) for o in rivals if o is not landmark):
                options.append((lk, rel, l_unique))
    if not options:
        return _phrase(rng, target, attrs)
    lk, rel, l_unique = options[rng.integers(len(options))]
    l_attrs = l_unique[rng.integers(len(l_unique))]
    return (f"{_phrase(rng, target, attrs)} that is {rel} the "
            f"{_phrase(rng, scene[lk], l_attrs)}")


def _new_value_word(rng, change, value):
    if change == "color":
        return value
    options = MATERIAL_WORDS[value]
    return options[rng.integers(len(options))]


def change_captions(rng, change, target_k, scene, details):
    """About six distinct captions for one change; ``scene`` is where the object is described."""
    captions = []
    for attempt in range(60):
        if len(captions) == CAPTIONS_PER_PAIR:
            break
        templates = CHANGE_TEMPLATES[change]
        template = templates[rng.integers(len(templates))]
        desc = _describe(rng, target_k, scene)
        article = "a" if change == "add" and (template.startswith("there") or rng.random() < 0.3) \
            else "the"
        new = _new_value_word(rng, change, details["after"]) if "after" in details and \
            change in ("color", "material") else ""
        caption = template.format(obj=f"{article} {desc}", new=new)
        if len(caption.split()) > MAX_TOKENS or caption in captions:
            continue
        captions.append(caption)
    return captions


def no_change_captions(rng):
    order = rng.permutation(len(NO_CHANGE_CAPTIONS))[:CAPTIONS_PER_PAIR]
    return [NO_CHANGE_CAPTIONS[i] for i in order]


# ----------------------------------------------------------------------------------------
# One scene
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


# ----------------------------------------------------------------------------------------
# Index files
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
    write_json_atomic(os.path.join(out_dir, "scenes.json"), scenes, indent=None)


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


# ----------------------------------------------------------------------------------------
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="root of the data layout to write")
    parser.add_argument("--num_scenes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes (default: all cores); the output does not depend on it")
    parser.add_argument("--start_id", type=int, default=0, help="id of the first scene")
    parser.add_argument("--supersample", type=int, default=SUPERSAMPLE,
                        help="rays per pixel along each axis (anti-aliasing)")
    parser.add_argument("--viewpoint_shift", type=float, default=1.0,
                        help="scale of the camera and light change of the changed and distractor images "
                             "(1: default; 2: twice as strong distractors)")
    parser.add_argument("--preview", metavar="PNG",
                        help="also write a sheet of a few triplets (one per change type) here")
    args = parser.parse_args(argv)
    try:
        start = time.time()
        records = generate(args.output_dir, args.num_scenes, args.seed, args.width, args.height,
                           args.workers, args.start_id, args.supersample, viewpoint_shift=args.viewpoint_shift)
        elapsed = time.time() - start
        print(f"{len(records)} scenes ({3 * len(records)} images of {args.width}x{args.height}) "
              f"in {elapsed:.1f} s: {3 * len(records) / elapsed:.1f} images/s with "
              f"{args.workers} workers -> {args.output_dir}")
        if args.preview:
            step = args.num_scenes // len(CHANGE_TYPES)
            ids = [args.start_id + k * step for k in range(len(CHANGE_TYPES))]
            preview(args.output_dir, args.preview, ids)
            print(f"preview: {args.preview}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
