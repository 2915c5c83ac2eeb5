"""Tests for the synthetic VQA scene generator (cmx.scenes): pure Python, no engine needed."""

import math
import re

import numpy as np
import pytest

from cmx import scenes
from cmx.scenes import (
    COLOR_NAMES,
    CORNERS,
    IMAGE_SIZE,
    QUESTION_TYPES,
    SHAPES,
    answer_matches,
    corner_object,
    make_example,
    make_example_full,
    make_scene,
    normalize_answer,
    relation_holds,
    split_seeds,
)


def test_scene_is_deterministic():
    for seed in (0, 7, 123456):
        a, b = make_scene(seed), make_scene(seed)
        assert a.objects == b.objects
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        ea, eb = make_example(seed), make_example(seed)
        assert ea[1:] == eb[1:]
        assert np.array_equal(np.asarray(ea[0]), np.asarray(eb[0]))
    assert make_scene(1).objects != make_scene(2).objects


def test_image_size_mode_and_objects():
    backgrounds = set()
    for seed in range(40):
        sc = make_scene(seed)
        backgrounds.add(sc.background)
        assert sc.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert sc.image.mode == "RGB"
        assert 1 <= len(sc.objects) <= 8
        for o in sc.objects:
            assert o.shape in SHAPES and o.color in COLOR_NAMES
            x0, y0, x1, y1 = o.bbox()
            assert x0 >= 0 and y0 >= 0 and x1 <= IMAGE_SIZE and y1 <= IMAGE_SIZE
        for i, a in enumerate(sc.objects):
            for b in sc.objects[i + 1:]:
                assert math.hypot(a.x - b.x, a.y - b.y) >= a.r + b.r  # no overlap
    assert backgrounds == set(scenes.BACKGROUNDS)


def test_object_colour_is_drawn():
    # the centre pixel of a circle/square/cross carries its named colour
    for seed in range(20):
        sc = make_scene(seed)
        arr = np.asarray(sc.image)
        for o in sc.objects:
            if o.shape in ("circle", "square", "cross"):
                px = arr[int(round(o.y)), int(round(o.x))]
                assert tuple(int(v) for v in px) == scenes.COLORS[o.color]


def test_splits_are_disjoint():
    tr, va, te = (set(split_seeds(s, 5000)) for s in ("train", "val", "test"))
    assert len(tr) == len(va) == len(te) == 5000
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert split_seeds("test", 10) == split_seeds("test", 10)  # fixed
    assert scenes.seed_split(split_seeds("val", 1)[0]) == "val"
    with pytest.raises(ValueError):
        split_seeds("dev", 3)


def _find(objects, desc):
    """Objects matching a description such as 'star' or 'red star'."""
    words = desc.split()
    if len(words) == 1:
        return [o for o in objects if o.shape == words[0]]
    return [o for o in objects if o.color == words[0] and o.shape == words[1]]


def _check(scene, q, a, qt):
    objs = scene.objects
    assert qt in QUESTION_TYPES
    assert a == normalize_answer(a) and len(a.split()) == 1
    if qt == "color":
        s = re.fullmatch(r"What color is the (\w+)\?", q).group(1)
        m = [o for o in objs if o.shape == s]
        assert len(m) == 1 and m[0].color == a
    elif qt == "shape":
        c = re.fullmatch(r"What shape is the (\w+) object\?", q).group(1)
        m = [o for o in objs if o.color == c]
        assert len(m) == 1 and m[0].shape == a
    elif qt == "count_shape":
        p = re.fullmatch(r"How many (\w+) are there\?", q).group(1)
        s = normalize_answer(p)
        assert s in SHAPES
        assert int(a) == sum(o.shape == s for o in objs)
    elif qt == "count_color":
        c = re.fullmatch(r"How many (\w+) objects are there\?", q).group(1)
        assert int(a) == sum(o.color == c for o in objs)
    elif qt == "exist":
        c, s = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q).groups()
        assert a == ("yes" if any(o.color == c and o.shape == s for o in objs) else "no")
    elif qt == "position":
        m = re.fullmatch(r"Is the (\w+(?: \w+)?) (to the left of|to the right of|above|below) the (\w+(?: \w+)?)\?", q)
        d1, rel, d2 = m.groups()
        o1, o2 = _find(objs, d1), _find(objs, d2)
        assert len(o1) == 1 and len(o2) == 1 and o1[0] is not o2[0]
        rel = rel.replace("to the ", "")
        v = relation_holds(o1[0], o2[0], rel)
        assert v is not None and a == ("yes" if v else "no")
        # and geometrically, with a margin
        a1, a2 = o1[0], o2[0]
        if rel == "left of":
            assert (a1.x < a2.x - 10) == (a == "yes")
        elif rel == "right of":
            assert (a1.x > a2.x + 10) == (a == "yes")
        elif rel == "above":
            assert (a1.y < a2.y - 10) == (a == "yes")
        else:
            assert (a1.y > a2.y + 10) == (a == "yes")
    elif qt == "corner":
        m = re.fullmatch(r"What (shape|color) is (?:the object )?in the (\w+ \w+) corner\?", q)
        what, corner = m.groups()
        assert corner in CORNERS
        o = corner_object(objs, corner)
        assert o is not None
        assert a == (o.shape if what == "shape" else o.color)
        h = IMAGE_SIZE / 2
        # every other object's centre lies outside that quadrant
        for other in objs:
            if other is not o:
                inside_x = (other.x < h) == ("left" in corner)
                inside_y = (other.y < h) == ("top" in corner)
                assert not (inside_x and inside_y)
    else:  # pragma: no cover
        raise AssertionError(qt)


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_answers_valid_per_type(qtype):
    answers = set()
    for seed in split_seeds("val", 25):
        sc, q, a, qt = make_example_full(seed, qtype)
        assert qt == qtype
        _check(sc, q, a, qt)
        answers.add(a)
    if qtype in ("exist", "position"):
        assert answers == {"yes", "no"}
    else:
        assert len(answers) >= 3


def test_random_examples_valid_and_all_types_occur():
    seen = set()
    for seed in range(150):
        sc, q, a, qt = make_example_full(seed)
        _check(sc, q, a, qt)
        seen.add(qt)
        img, q2, a2, qt2 = make_example(seed)
        assert (q2, a2, qt2) == (q, a, qt)
    assert seen == set(QUESTION_TYPES)


def test_normalize_answer():
    assert normalize_answer("Red.") == "red"
    assert normalize_answer("  The Star!") == "star"
    assert normalize_answer("a circle") == "circle"
    assert normalize_answer("Three") == "3"
    assert normalize_answer("zero") == "0"
    assert normalize_answer("4") == "4"
    assert normalize_answer("Yes!") == "yes"
    assert normalize_answer("Nope") == "no"
    assert normalize_answer("No.<|im_end|>") == "no"
    assert normalize_answer("Grey") == "gray"
    assert normalize_answer("crosses") == "cross"
    assert answer_matches("Red.", "red")
    assert answer_matches("red star", "red")
    assert not answer_matches("blue", "red")
    assert not answer_matches("", "red")


def test_scene_variants_are_deterministic_and_within_their_ranges():
    for variant, (lo, hi, r_min, r_max) in scenes.VARIANTS.items():
        for seed in range(6):
            a, b = scenes.make_scene(seed, variant), scenes.make_scene(seed, variant)
            assert a.objects == b.objects and a.image.tobytes() == b.image.tobytes()
            assert 1 <= len(a.objects) <= hi
            assert all(r_min <= o.r <= r_max for o in a.objects)
    assert len(scenes.make_scene(3, "crowded").objects) > 8
    with pytest.raises(ValueError, match="unknown scene variant"):
        scenes.make_scene(0, "huge")
    scene, q, a, qt = scenes.make_example_full(11, "color", "small")
    assert qt == "color" and all(o.r <= 12 for o in scene.objects)
