"""The ray caster of the synthetic CLEVR-Change generator, vectorised over pixels with numpy.

A ground plane, spheres, cubes and cylinders, Lambert + Blinn-Phong shading, a shadow ray towards
the key light, and a cheap environment reflection on metal; render() draws one image, _boxes()
reads every object's visible box off its index map, _project() places world points in the image.
"""
import math

import numpy as np

from utils.clevr_objects import COLORS

SIZES = {"large": 0.7, "small": 0.35}  # CLEVR's object "radius" in world units

GROUND_ALBEDO = 0.60
SKY = 0.62
SUPERSAMPLE = 2  # rays per pixel along each axis (anti-aliasing)


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
