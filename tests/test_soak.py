"""tools/soak.py, short: its loop through cmx-chat's REPL (default model, CoreMatching) for 24 turns
on 3 images, with a context that overflows at the second image of a conversation. The repeated question gets the same answer
every time and nothing fails; the RSS target belongs to the tool's full run (300 turns)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import soak  # noqa: E402


def test_schedule_is_seeded(tmp_path):
    images = soak.write_images(str(tmp_path), 3)
    first = soak.make_schedule(images, 50, seed=1, probe_every=10)
    assert first == soak.make_schedule(images, 50, seed=1, probe_every=10)
    assert [t.kind for t in first[::10]] == ["probe"] * 5
    assert {t.kind for t in first} == {"probe", *soak.TURN_KINDS}


def test_short_soak(tmp_path):
    images = soak.write_images(str(tmp_path), 3)
    schedule = soak.make_schedule(images, 24, seed=0, probe_every=6, warmup_fill=False)
    # n_ctx 1000 holds one image (576 rows): a second one overflows, and the conversation goes on
    run = soak.run_mode("corematching", images, schedule, n_predict=8, ctx_size=1000)
    s = run["summary"]
    assert s["turns"] == 24 and s["kinds"]["probe"] == 4
    assert s["probes_identical"], s["probe_answers"]
    assert s["overflows"] >= 1
    assert all(r["rss_bytes"] > 0 for r in run["turns"])
