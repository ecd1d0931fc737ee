"""Writes the sample prompt sources of this folder (run from the repository root: python data/samples/write_samples.py).

They imitate the real formats, not the real data: every prompt here was written for this project. They hold on
purpose what the prompt builder must handle: Midjourney parameters and weights, URLs, HTML entities and tags,
full-width and zero-width characters, exact and near duplicates within and across sources, an over-long prompt,
captions below the aesthetic threshold, a null caption and a mostly numeric one.

``reg_pairs/`` holds a few drawn image–caption pairs for the image regularization (a folder source), and
``reg_manifest.csv`` lists them with an aesthetic score, one below 6.25 (a manifest source with the numeric filter).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).parent

JOURNEYDB = [
    "a lighthouse on a cliff at dawn, dramatic clouds, oil painting --ar 16:9 --v 5",
    "A lighthouse on a cliff at dawn; dramatic clouds, oil painting --q 2",
    "a lighthouse on a rocky cliff at dawn, dramatic clouds, oil painting",
    "portrait of an old fisherman, deep wrinkles, rim light, 85mm photo --style raw --s 250",
    "https://s.mj.run/xYz12AbC portrait of an old fisherman, deep wrinkles, rim light, 85mm photo",
    "isometric cozy bedroom with plants and a cat sleeping on the bed, pastel colors --niji 5",
    "hot air balloons::2 over the desert::1 at sunrise --ar 3:2",
    "ｆｕｌｌｗｉｄｔｈ robot gardener watering tomatoes, studio ghibli style",
    "a glass\u200b teapot with a tiny ocean inside, product photo, soft shadows",
    "a red fox in the snow, national geographic photo, 4k --no text, watermark",
    "a red fox in the snow, national geographic photo, 8k",
    "Tom &amp; Jerry style chase through a library, cartoon, dynamic angle",
    "a steampunk airship docking at a floating city above the clouds, brass and copper details, intricate "
    "machinery, hundreds of tiny windows glowing warm yellow, crowds of passengers on wooden platforms, flags "
    "waving in the wind, seagulls, late afternoon golden light, volumetric god rays through the clouds, ultra "
    "detailed matte painting, trending on artstation, by a concept artist of a blockbuster film, 8k resolution",
    "minimalist poster of a mountain range, two colors, swiss design --ar 2:3 --v 6.0",
    "a bowl of ramen with a soft boiled egg, steam rising, food photography",
    "watercolor map of an imaginary island with a volcano and three villages",
    "a knight in shining armor kneeling before a dragon, epic fantasy art",
    "cyberpunk street market at night, neon signs in the rain, cinematic --ar 21:9 --c 20",
    "--ar 1:1 --v 5",
    "ok",
]

LAION = [
    ("A lighthouse on a cliff at dawn, dramatic clouds, oil painting", 6.8),
    ("Handmade ceramic mug with blue glaze &amp;amp; gold rim", 6.4),
    ("Vintage travel poster of the Swiss Alps <br> railway through the mountains", 6.9),
    ("Aerial view of a turquoise lagoon with a sandbar", 7.1),
    ("aerial view of a turquoise lagoon with a small sandbar", 6.6),
    ("Stock photo: businessman shaking hands in an office", 4.9),
    ("Cute corgi puppy sitting in a field of sunflowers", 6.3),
    ("Cute corgi puppy sitting in a field of sunflowers", 6.3),
    ("2048 x 1536 0045 1123", 6.5),
    (None, 6.7),
    ("Oil painting of a stormy sea with a small boat, dark and moody", 6.25),
    ("Scandinavian living room interior with a grey sofa and wooden floor", 5.8),
    ("Macro photo of a dew drop on a spider web at sunrise", 7.3),
    ("Illustration of a fox reading a book under a tree, children's book style", 6.9),
    ("Abstract geometric pattern in teal and orange, flat vector", 6.1),
]

USER = [
    ("u1", "a snowy owl perched on a frozen branch, moonlight", "mine"),
    ("u2", "a cup of coffee on a rainy windowsill, cozy, film photo", "with, commas"),
    ("u3", "a red fox in the snow, national geographic photo, 4k", "same as a JourneyDB prompt"),
    ("u4", "   ", "blank"),
    ("u5", "a paper boat sailing down a rainy street gutter, macro", ""),
]


REG_PAIRS = [
    ("red_circle", "a red circle on a blue background", ((200, 30, 30), (30, 60, 200), "ellipse"), 6.8),
    ("yellow_square", "a yellow square on a green background", ((230, 210, 40), (40, 150, 60), "rectangle"), 6.5),
    ("white_disc", "a white disc on a black background", ((245, 245, 245), (10, 10, 10), "ellipse"), 7.0),
    ("orange_box", "an orange box on a grey background", ((240, 140, 20), (128, 128, 128), "rectangle"), 5.9),
    ("purple_circle", "a purple circle on a pink background", ((120, 40, 160), (250, 180, 200), "ellipse"), 6.25),
    ("blue_square", "a blue square on a white background", ((30, 60, 200), (250, 250, 250), "rectangle"), 6.3),
]


def write_reg_pairs() -> None:
    from PIL import Image, ImageDraw

    folder = HERE / "reg_pairs"
    folder.mkdir(exist_ok=True)
    for i, (name, caption, (fg, bg, shape), _) in enumerate(REG_PAIRS):
        w, h = 48 + 8 * (i % 3), 40 + 4 * (i % 2)  # not square: the loader crops the center
        im = Image.new("RGB", (w, h), bg)
        getattr(ImageDraw.Draw(im), shape)((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=fg)
        im.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    with open(HERE / "reg_manifest.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "AESTHETIC_SCORE"])
        w.writerows((f"reg_pairs/{name}.png", caption, score) for name, caption, _, score in REG_PAIRS)


def main() -> None:
    with open(HERE / "journeydb_sample.jsonl", "w", encoding="utf-8") as f:
        for i, prompt in enumerate(JOURNEYDB):
            record = {"img_path": f"./{i // 10:03d}/{i:08x}.jpg", "prompt": prompt,
                      "Task1": {"Style": [], "Content": []}, "Task2": {"Caption": f"an image for sample {i}"}}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "URL": [f"https://example.com/laion-sample/{i}.jpg" for i in range(len(LAION))],
        "TEXT": [t for t, _ in LAION],
        "WIDTH": pa.array([512] * len(LAION), pa.int32()),
        "HEIGHT": pa.array([512] * len(LAION), pa.int32()),
        "AESTHETIC_SCORE": pa.array([a for _, a in LAION], pa.float64()),
    })
    pq.write_table(table, HERE / "laion_sample.parquet")

    with open(HERE / "user_prompts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "notes"])
        w.writerows(USER)
    write_reg_pairs()


if __name__ == "__main__":
    main()
