"""The mini-world generator: captions state what the pixels show, splits are disjoint, everything is seeded."""

import numpy as np

from sb2.miniworld import world
from sb2.miniworld.world import COLORS, RGB, SHAPES, make_pairs, sample_scenes


def test_same_seed_same_pairs_and_ranges_agree():
    a_img, a_cap, _ = make_pairs(7, "train", 1500)
    b_img, b_cap, _ = make_pairs(7, "train", 300, start=1100)
    assert np.array_equal(a_img[1100:1400], b_img) and a_cap[1100:1400] == b_cap
    c_img, c_cap, _ = make_pairs(8, "train", 300, start=1100)
    assert not np.array_equal(b_img, c_img) and b_cap != c_cap


def test_rendered_pixels_show_the_recorded_colors_at_the_recorded_places():
    images, _, scenes = make_pairs(0, "eval", 400)
    checked = 0
    for i in range(len(scenes)):
        for k in range(int(scenes.count[i])):
            x, y = np.round(scenes.center[i, k]).astype(int)
            if SHAPES[scenes.shape[i, k]] == "ring":  # the ring's hole is at its center: look on the ring
                x = int(np.round(scenes.center[i, k, 0] + 0.72 * scenes.radius[i, k]))
            # a later object may overlap this one; only check pixels no other object is near
            others = [j for j in range(int(scenes.count[i])) if j != k]
            if any(np.hypot(*(scenes.center[i, j] - (x, y))) < scenes.radius[i, j] + 2 for j in others):
                continue
            pixel = images[i, y, x].astype(np.float32)
            nearest = np.argmin(((RGB - pixel) ** 2).sum(1))
            assert COLORS[nearest] == COLORS[scenes.color[i, k]], (i, k)
            checked += 1
    assert checked > 500


def test_captions_state_only_true_attributes():
    _, caps, scenes = make_pairs(1, "train", 300)
    for i, cap in enumerate(caps):
        objs = scenes.objects(i)
        for o in objs:
            assert o["shape"] in cap
            if o["says_color"]:
                assert f"{o['color']} " in cap
            if o["says_position"]:
                assert world.POSITIONS[o["cell"]] in cap
        if scenes.says_background[i]:
            assert world.BACKGROUNDS[scenes.background[i]] in cap
        named_shapes = sum(cap.count(s) for s in SHAPES)
        assert named_shapes == len(objs)


def test_splits_are_disjoint_and_hold_out_pairs():
    _, train_caps, train = make_pairs(0, "train", 4000)
    _, eval_caps, ev = make_pairs(0, "eval", 2000)
    assert not set(train_caps) & set(eval_caps)
    held = {(COLORS.index(c), SHAPES.index(s)) for c, s in world.HELD_OUT}
    def pairs(sc):
        return {(c, s) for c, s in zip(sc.color.ravel(), sc.shape.ravel()) if s >= 0}

    assert not pairs(train) & held
    assert held <= pairs(ev)
    assert set(world.TRAIN_FRAMES).isdisjoint(world.EVAL_FRAMES)


def test_under_specified_captions_and_one_object_per_cell():
    scenes = sample_scenes(3, "train", 2000)
    assert (~scenes.says_position[scenes.shape >= 0]).mean() > 0.2
    for i in range(50):
        cells = scenes.cell[i][scenes.shape[i] >= 0]
        assert len(set(cells.tolist())) == len(cells)


def test_caption_files_keep_prompts_and_evaluation_apart(tmp_path):
    from sb2.miniworld.captions import write_caption_files, write_reference_images

    paths = write_caption_files(tmp_path, num_prompts=300, num_eval=20)
    prompts = paths["prompts"].read_text().splitlines()
    evals = paths["eval_captions"].read_text().splitlines()
    assert len(prompts) == len(set(prompts)) == 300 and len(evals) == 20
    assert not set(prompts) & set(evals)
    assert evals == make_pairs(0, "eval", 20)[1]
    ref = write_reference_images(tmp_path / "ref", num_eval=3)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(ref / "000002.png")), make_pairs(0, "eval", 3)[0][2])
