"""Kept image tokens drawn on the image: the patch geometry of mtmd's fixed-size preprocessing,
the drawing, and cmx-chat --show-kept."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cmx.kept import draw_kept, patch_boxes


def test_square_image_maps_patches_to_the_grid():
    boxes = patch_boxes(336, 336, 576, 336)
    assert boxes.shape == (576, 4)
    assert boxes[0].tolist() == [0, 0, 14, 14]
    assert boxes[25].tolist() == [14, 14, 28, 28]  # row 1, column 1
    assert boxes[575].tolist() == [322, 322, 336, 336]
    # a larger square image scales every patch
    assert patch_boxes(672, 672, 576, 336)[25].tolist() == [28, 28, 56, 56]


def test_wide_image_is_padded_above_and_below():
    # 672x336 -> scaled by 1/2 to 336x168, centred: rows 0..5 and 18..23 are padding
    boxes = patch_boxes(672, 336, 576, 336)
    assert boxes[0][3] - boxes[0][1] == 0  # row 0 lies on the padding
    row = 12 * 24
    assert boxes[row].tolist() == [0, 168, 28, 196]
    assert boxes[row + 23].tolist() == [644, 168, 672, 196]
    tall = patch_boxes(100, 300, 576, 336)  # padded left and right
    assert tall[:, [0, 2]].min() == 0 and tall[:, [0, 2]].max() == 100


def test_drawing_dims_pruned_and_outlines_kept():
    img = Image.new("RGB", (336, 336), (200, 100, 50))
    out = np.asarray(draw_kept(img, [25], 576, 336, dim=0.5, outline=(0, 255, 0)))
    assert out.shape == (336, 336, 3)
    assert out[20, 20].tolist() == [200, 100, 50]  # inside kept patch 25 (14..28)
    assert out[14, 20].tolist() == [0, 255, 0]  # its outline
    assert out[100, 100].tolist() == [100, 50, 25]  # pruned: dimmed to half
    everything = np.asarray(draw_kept(img, range(576), 576, 336, outline=(200, 100, 50)))
    assert (everything == [200, 100, 50]).all()  # all kept: nothing dimmed


@pytest.mark.parametrize("kept, n_tokens, message", [([0], 500, "not a square grid"), ([576], 576, "must lie in"),
                                                       ([-1], 576, "must lie in")])
def test_bad_arguments_raise(kept, n_tokens, message):
    with pytest.raises(ValueError, match=message):
        draw_kept(Image.new("RGB", (10, 10)), kept, n_tokens, 336)


def test_cli_show_kept_draws_what_was_kept(tmp_path):
    from cmx import scenes

    scene = scenes.make_scene(123)
    path = tmp_path / "scene.png"
    scene.image.save(path)
    out = tmp_path / "kept.png"
    r = subprocess.run([sys.executable, "-m", "cmx.cli", str(path), "-p", "What color is the star?", "-n", "4",
                        "-t", "2", "--keep-tokens", "50", "--show-kept", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "kept image tokens drawn" in r.stderr
    drawn = np.asarray(Image.open(out).convert("RGB"), np.int16)
    original = np.asarray(scene.image.convert("RGB"), np.int16)
    assert drawn.shape == original.shape
    # patch centres: exactly the 50 kept patches keep their pixels (the rest are dimmed)
    centres = np.arange(24) * 14 + 7
    same = (drawn[np.ix_(centres, centres)] == original[np.ix_(centres, centres)]).all(axis=-1)
    dark = (original[np.ix_(centres, centres)].sum(axis=-1) == 0)  # black pixels look alike dimmed
    assert (same & ~dark).sum() <= 50 <= same.sum()
