"""Synthetic visual-question-answering scenes (numpy + Pillow only).

Every scene is a 336x336 RGB image holding 1-8 non-overlapping objects (a shape in a named colour)
on a varied background, and every question has a one-word answer that is unambiguous given the
object list. All of it is deterministic by seed:

    >>> from cmx.scenes import make_example
    >>> image, question, answer, qtype = make_example(123)

Train, val and test use disjoint seed ranges (``split_seeds``). This module must stay free of the
compiled engine: it imports nothing from cmx.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336

# Well-separated named colours (RGB). Backgrounds are kept muted and mid-toned so that each of
# these stands out from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "orange": (250, 135, 10),
    "purple": (135, 40, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOR_NAMES = tuple(COLORS)

SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}

BACKGROUNDS = ("plain", "gradient", "noise", "texture", "clutter")

# Object half-extent (radius of the bounding circle) in pixels: small to large.
MIN_RADIUS = 11
MAX_RADIUS = 36
MIN_GAP = 6  # pixels between the bounding circles of two objects
EDGE_MARGIN = 4

CORNERS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# A relative-position question is asked only when the two centres differ by at least this much
# along the asked axis (and the objects' extents do not overlap along it).
POSITION_MARGIN = 12

QUESTION_TYPES = (
    "color",        # What color is the star?               -> colour (exactly one star)
    "shape",        # What shape is the red object?         -> shape (exactly one red object)
    "count_shape",  # How many circles are there?           -> digit 0-8
    "count_color",  # How many blue objects are there?      -> digit 0-8
    "exist",        # Is there a green triangle?            -> yes/no
    "position",     # Is the red circle left of the star?   -> yes/no
    "corner",       # What shape is in the top left corner? -> shape or colour
)

# Disjoint seed ranges per split.
SPLIT_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_SIZE = 1_000_000_000


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    x: float  # centre, pixels
    y: float
    r: float  # radius of the bounding circle, pixels
    angle: float  # rotation in degrees

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def bbox(self) -> tuple[float, float, float, float]:
        return (self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r)


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    background: str
    seed: int = 0
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Rendering

def _shape_polygon(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    a0 = math.radians(angle)

    def rot(px: float, py: float) -> tuple[float, float]:
        c, s = math.cos(a0), math.sin(a0)
        return (x + px * c - py * s, y + px * s + py * c)

    if shape == "square":
        h = r / math.sqrt(2.0)
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        # equilateral, pointing up, inscribed in the bounding circle
        pts = [(r * math.cos(math.radians(-90 + 120 * k)), r * math.sin(math.radians(-90 + 120 * k)))
               for k in range(3)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            t = math.radians(-90 + 36 * k)
            pts.append((rr * math.cos(t), rr * math.sin(t)))
    elif shape == "cross":
        # plus sign; arm half-width w, arm half-length L with corners on the bounding circle
        w = r * 0.30
        L = math.sqrt(r * r - w * w)
        pts = [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w),
               (-L, w), (-L, -w), (-w, -w)]
    else:
        raise ValueError(shape)
    return [rot(px, py) for px, py in pts]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        r = obj.r * 0.92
        draw.ellipse((obj.x - r, obj.y - r, obj.x + r, obj.y + r), fill=fill)
    else:
        draw.polygon(_shape_polygon(obj.shape, obj.x, obj.y, obj.r, obj.angle), fill=fill)


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A mid-toned, low-saturation colour: far from every named object colour."""
    level = rng.uniform(95, 165)
    tint = rng.uniform(-22, 22, size=3)
    return np.clip(level + tint, 0, 255)


def _background(rng: np.random.Generator, kind: str) -> np.ndarray:
    n = IMAGE_SIZE
    base = _muted_color(rng)
    if kind == "plain":
        img = np.broadcast_to(base, (n, n, 3)).astype(np.float32)
    elif kind == "gradient":
        other = _muted_color(rng)
        t = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)
        w = (xx - 0.5) * math.cos(t) + (yy - 0.5) * math.sin(t)
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-6)
        img = base[None, None, :] * (1 - w[..., None]) + other[None, None, :] * w[..., None]
    elif kind == "noise":
        sigma = rng.uniform(6, 16)
        # blocky noise at a random scale
        cell = int(rng.choice([1, 2, 4, 8]))
        m = n // cell
        noise = rng.normal(0, sigma, size=(m, m, 1)) + rng.normal(0, sigma * 0.3, size=(m, m, 3))
        noise = np.repeat(np.repeat(noise, cell, axis=0), cell, axis=1)
        img = base[None, None, :] + noise
    elif kind == "texture":
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        amp = rng.uniform(8, 18)
        period = rng.uniform(10, 40)
        style = int(rng.integers(3))
        if style == 0:  # stripes
            t = rng.uniform(0, math.pi)
            v = np.sin((xx * math.cos(t) + yy * math.sin(t)) * 2 * math.pi / period)
        elif style == 1:  # checkerboard
            p = max(int(period), 6)
            v = (((xx // p) + (yy // p)) % 2) * 2.0 - 1.0
        else:  # waves
            v = np.sin(xx * 2 * math.pi / period) * np.cos(yy * 2 * math.pi / (period * 1.3))
        img = base[None, None, :] + amp * v[..., None]
    elif kind == "clutter":
        img = np.broadcast_to(base, (n, n, 3)).astype(np.float32).copy()
    else:
        raise ValueError(kind)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if kind == "clutter":
        pil = Image.fromarray(img)
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(15, 40))):
            c = tuple(int(v) for v in np.clip(base + rng.uniform(-25, 25, size=3), 0, 255))
            x0, y0 = rng.uniform(0, n, size=2)
            kind2 = int(rng.integers(3))
            if kind2 == 0:  # thin line
                x1, y1 = x0 + rng.uniform(-60, 60), y0 + rng.uniform(-60, 60)
                d.line((x0, y0, x1, y1), fill=c, width=int(rng.integers(1, 3)))
            elif kind2 == 1:  # small dot
                s = rng.uniform(1, 4)
                d.ellipse((x0 - s, y0 - s, x0 + s, y0 + s), fill=c)
            else:  # squiggle
                pts = [(x0, y0)]
                for _ in range(4):
                    pts.append((pts[-1][0] + rng.uniform(-15, 15), pts[-1][1] + rng.uniform(-15, 15)))
                d.line(pts, fill=c, width=1)
        img = np.asarray(pil)
    return img


# Scene variants: (fewest objects, most objects, smallest radius, largest radius). "standard" is
# the demo model's training distribution; the others are harder test sets (more objects, or
# objects of a few patches) for comparing token selections.
VARIANTS = {
    "standard": (1, 8, MIN_RADIUS, MAX_RADIUS),
    "crowded": (9, 16, 9, 22),
    "small": (1, 8, 6, 12),
    "pair": (2, 3, MIN_RADIUS, MAX_RADIUS),  # training only: relations without distractors
}


def _place_objects(rng: np.random.Generator, count: int, variant: str = "standard") -> list[tuple[float, float, float]]:
    _, _, r_min, r_max = VARIANTS[variant]
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _attempt in range(200):
            # bias towards small and medium sizes; larger scenes get smaller objects
            hi = (r_max if count <= 4 else r_max - 8) if variant == "standard" else r_max
            r = float(r_min + (hi - r_min) * rng.random() ** 1.3)
            lo_c, hi_c = r + EDGE_MARGIN, IMAGE_SIZE - r - EDGE_MARGIN
            x, y = float(rng.uniform(lo_c, hi_c)), float(rng.uniform(lo_c, hi_c))
            if all(math.hypot(x - px, y - py) >= r + pr + MIN_GAP for px, py, pr in placed):
                placed.append((x, y, r))
                break
    return placed


def make_scene(seed: int, variant: str = "standard") -> Scene:
    """Deterministic scene for ``seed``: objects (1-8 in the standard variant, see VARIANTS) on one
    of the BACKGROUNDS."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown scene variant {variant!r} (one of {sorted(VARIANTS)})")
    rng = np.random.default_rng([int(seed), 0x5CE7E])
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = _background(rng, background)
    lo, hi = VARIANTS[variant][:2]
    count = int(rng.integers(lo, hi + 1))
    spots = _place_objects(rng, count, variant)
    # A third of the scenes draw from a reduced palette (2 shapes, 3 colours) so that counts
    # above 2 are common.
    if rng.random() < 0.35:
        shape_pool = [SHAPES[i] for i in rng.choice(len(SHAPES), size=2, replace=False)]
        color_pool = [COLOR_NAMES[i] for i in rng.choice(len(COLOR_NAMES), size=3, replace=False)]
    else:
        shape_pool, color_pool = list(SHAPES), list(COLOR_NAMES)
    objects = []
    for x, y, r in spots:
        shape = shape_pool[int(rng.integers(len(shape_pool)))]
        color = color_pool[int(rng.integers(len(color_pool)))]
        angle = float(rng.uniform(-20, 20)) if shape in ("square", "triangle", "star", "cross") else 0.0
        objects.append(SceneObject(shape, color, round(x, 2), round(y, 2), round(r, 2), round(angle, 2)))
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for obj in objects:
        _draw_object(draw, obj)
    return Scene(image=pil, objects=objects, background=background, seed=int(seed))


# --------------------------------------------------------------------------------------------
# Questions

def _count(objects, shape=None, color=None) -> int:
    return sum(1 for o in objects if (shape is None or o.shape == shape) and (color is None or o.color == color))


def _corner_box(corner: str) -> tuple[float, float, float, float]:
    h = IMAGE_SIZE / 2
    x0 = 0.0 if "left" in corner else h
    y0 = 0.0 if "top" in corner else h
    return (x0, y0, x0 + h, y0 + h)


def _in_box(obj: SceneObject, box) -> bool:
    x0, y0, x1, y1 = obj.bbox()
    return x0 >= box[0] and y0 >= box[1] and x1 <= box[2] and y1 <= box[3]


def _touches_box(obj: SceneObject, box) -> bool:
    x0, y0, x1, y1 = obj.bbox()
    return x1 > box[0] and x0 < box[2] and y1 > box[1] and y0 < box[3]


def corner_object(objects, corner: str):
    """The object alone in ``corner`` (quadrant), or None.

    A corner is one quadrant of the image. It has an answer when exactly one object lies wholly
    inside the quadrant and no other object reaches into it."""
    box = _corner_box(corner)
    touching = [o for o in objects if _touches_box(o, box)]
    if len(touching) == 1 and _in_box(touching[0], box):
        return touching[0]
    return None


def _describe(objects, obj: SceneObject) -> str | None:
    """Shortest unique description: 'star' if only one star, 'red star' if only one of those."""
    if _count(objects, shape=obj.shape) == 1:
        return obj.shape
    if _count(objects, shape=obj.shape, color=obj.color) == 1:
        return obj.name
    return None


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool | None:
    """True/False when the relation between a and b is clear, None when too close to call."""
    if relation in ("left of", "right of"):
        d = b.x - a.x  # > 0: a is left of b
        clear = abs(d) >= POSITION_MARGIN and abs(d) >= max(a.r, b.r)
        if not clear:
            return None
        return d > 0 if relation == "left of" else d < 0
    d = b.y - a.y  # > 0: a is above b
    clear = abs(d) >= POSITION_MARGIN and abs(d) >= max(a.r, b.r)
    if not clear:
        return None
    return d > 0 if relation == "above" else d < 0


def _q_color(rng, objects):
    shapes = [s for s in SHAPES if _count(objects, shape=s) == 1]
    if not shapes:
        return None
    s = shapes[int(rng.integers(len(shapes)))]
    obj = next(o for o in objects if o.shape == s)
    return f"What color is the {s}?", obj.color


def _q_shape(rng, objects):
    colors = [c for c in COLOR_NAMES if _count(objects, color=c) == 1]
    if not colors:
        return None
    c = colors[int(rng.integers(len(colors)))]
    obj = next(o for o in objects if o.color == c)
    return f"What shape is the {c} object?", obj.shape


def _q_count_shape(rng, objects):
    present = sorted({o.shape for o in objects}, key=SHAPES.index)
    s = present[int(rng.integers(len(present)))] if rng.random() < 0.85 else SHAPES[int(rng.integers(len(SHAPES)))]
    return f"How many {SHAPE_PLURALS[s]} are there?", str(_count(objects, shape=s))


def _q_count_color(rng, objects):
    present = sorted({o.color for o in objects}, key=COLOR_NAMES.index)
    c = present[int(rng.integers(len(present)))] if rng.random() < 0.85 else COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    return f"How many {c} objects are there?", str(_count(objects, color=c))


def _q_exist(rng, objects):
    if rng.random() < 0.5:
        obj = objects[int(rng.integers(len(objects)))]
        s, c = obj.shape, obj.color
    else:
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if _count(objects, shape=s, color=c) == 0]
        # prefer near misses: right shape or right colour present
        near = [(c, s) for c, s in absent if _count(objects, shape=s) or _count(objects, color=c)]
        pool = near if near and rng.random() < 0.7 else absent
        c, s = pool[int(rng.integers(len(pool)))]
    ans = "yes" if _count(objects, shape=s, color=c) else "no"
    article = "an" if c[0] in "aeiou" else "a"
    return f"Is there {article} {c} {s}?", ans


def _q_position(rng, objects):
    pairs = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i == j:
                continue
            da, db = _describe(objects, a), _describe(objects, b)
            if da is None or db is None:
                continue
            for rel in RELATIONS:
                v = relation_holds(a, b, rel)
                if v is not None:
                    pairs.append((da, db, rel, v))
    if not pairs:
        return None
    # balance yes / no
    want = rng.random() < 0.5
    pool = [p for p in pairs if p[3] == want] or pairs
    da, db, rel, v = pool[int(rng.integers(len(pool)))]
    return f"Is the {da} {_RELATION_TEXT[rel]} the {db}?", "yes" if v else "no"


def _q_corner(rng, objects):
    options = [(c, o) for c in CORNERS if (o := corner_object(objects, c)) is not None]
    if not options:
        return None
    corner, obj = options[int(rng.integers(len(options)))]
    if rng.random() < 0.5:
        return f"What shape is in the {corner} corner?", obj.shape
    return f"What color is the object in the {corner} corner?", obj.color


_GENERATORS = {
    "color": _q_color,
    "shape": _q_shape,
    "count_shape": _q_count_shape,
    "count_color": _q_count_color,
    "exist": _q_exist,
    "position": _q_position,
    "corner": _q_corner,
}


def make_question(scene: Scene, seed: int, qtype: str | None = None):
    """(question, answer, qtype) for ``scene``. A qtype that has no unambiguous question for this
    scene falls through to the next possible type (count and exist questions always exist)."""
    rng = np.random.default_rng([int(seed), 0x0A5C])
    order = list(QUESTION_TYPES)
    start = QUESTION_TYPES.index(qtype) if qtype is not None else int(rng.integers(len(order)))
    for k in range(len(order)):
        qt = order[(start + k) % len(order)]
        qa = _GENERATORS[qt](rng, scene.objects)
        if qa is not None:
            return qa[0], qa[1], qt
    raise AssertionError("unreachable: count questions always exist")


def make_example_full(seed: int, qtype: str | None = None, variant: str = "standard"):
    """(scene, question, answer, qtype): like make_example, with the Scene (and so its object
    list) instead of the bare image. ``qtype`` asks for one question type; when that type has no
    unambiguous question for the scene, the scenes of seed + k * 7919 (k = 1, 2, ...) are tried."""
    if qtype is None:
        scene = make_scene(seed, variant)
        q, a, qt = make_question(scene, seed)
        return scene, q, a, qt
    if qtype not in _GENERATORS:
        raise ValueError(f"unknown question type {qtype!r}")
    for k in range(1000):
        s = int(seed) + k * 7919
        scene = make_scene(s, variant)
        qa = _GENERATORS[qtype](np.random.default_rng([s, 0x0A5C, 1]), scene.objects)
        if qa is not None:
            return scene, qa[0], qa[1], qtype
    raise RuntimeError(f"no {qtype} question found near seed {seed}")


def make_example(seed: int, qtype: str | None = None):
    """(image, question, answer, qtype), deterministic by seed (and qtype)."""
    scene, q, a, qt = make_example_full(seed, qtype)
    return scene.image, q, a, qt


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """``n`` seeds of ``split`` ('train', 'val', 'test'), from offset ``start``. Ranges are disjoint."""
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}")
    if start < 0 or n < 0 or start + n > SPLIT_SIZE:
        raise ValueError("seed range out of bounds")
    base = SPLIT_BASE[split] + start
    return list(range(base, base + n))


def seed_split(seed: int) -> str:
    for name, base in SPLIT_BASE.items():
        if base <= seed < base + SPLIT_SIZE:
            return name
    raise ValueError(seed)


# --------------------------------------------------------------------------------------------
# Answers

_NUMBER_WORDS = {
    "zero": "0", "none": "0", "no one": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "false", "incorrect"}
_ARTICLES = {"a", "an", "the"}
_ALIASES = {"grey": "gray", "colour": "color", "violet": "purple", "plus": "cross"}
_PLURAL_TO_SHAPE = {p: s for s, p in SHAPE_PLURALS.items()}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, number words -> digits, yes/no synonyms,
    plural shapes -> singular. Returns the normalised words joined by single spaces."""
    t = text.strip().lower()
    t = re.sub(r"<\|[^|>]*\|>", " ", t)  # stray special tokens such as <|im_end|>
    t = re.sub(r"[^\w\s]", " ", t)
    words = [w for w in t.split() if w not in _ARTICLES]
    out = []
    for w in words:
        w = _ALIASES.get(w, w)
        w = _NUMBER_WORDS.get(w, w)
        w = _PLURAL_TO_SHAPE.get(w, w)
        if w in _YES:
            w = "yes"
        elif w in _NO:
            w = "no"
        out.append(w)
    return " ".join(out)


def answer_matches(prediction: str, answer: str) -> bool:
    """Exact match after normalisation; a prediction whose first word is the answer also counts
    (e.g. 'Red.' or 'red star' for 'red' does, 'It is red' does not)."""
    p = normalize_answer(prediction)
    a = normalize_answer(answer)
    return p == a or (p.split()[:1] == [a])


ANSWER_VOCAB = tuple(COLOR_NAMES) + tuple(SHAPES) + tuple(str(i) for i in range(9)) + ("yes", "no")


def label_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8 map: 0 for background, k + 1 where object k is drawn (later objects win, as
    in the image). For dense auxiliary supervision and for tests."""
    lab = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(lab)
    for k, obj in enumerate(scene.objects):
        if obj.shape == "circle":
            r = obj.r * 0.92
            draw.ellipse((obj.x - r, obj.y - r, obj.x + r, obj.y + r), fill=k + 1)
        else:
            draw.polygon(_shape_polygon(obj.shape, obj.x, obj.y, obj.r, obj.angle), fill=k + 1)
    return np.asarray(lab)
