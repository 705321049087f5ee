"""The one-stage run on ImageNet-sized images: the shipped CPU config end to end through
train/main.py on a small image folder made here (search, stop, train, absorb, export,
the SavedModel evaluated), and ``--mode=describe`` of the genotype it found at the
ImageNet network's size. (The ImageNet super-net itself: tests/absorption_test.py.)"""

import json

import numpy as np
import pytest
from main_runner import assert_evaluations_match, last_json, run_main, run_to_completion
from PIL import Image

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 12, 4


def _image_folder(root):
    """A few classes of generated images, 72 to 224 pixels a side (ImageNet-like: over
    64), each class a colour of its own under noise, so that it can be learned."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label in range(CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            colour = np.roll([220, 40, 40], label)
            for i in range(count):
                height, width = rng.integers(72, 225, size=2)
                noise = rng.normal(0, 40, (height, width, 3))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


@pytest.mark.slow
def test_imagenet_cpu_config_searches_trains_absorbs_exports_and_evaluates(tmp_path):
    folder = _image_folder(tmp_path / "images")
    model_dir = tmp_path / "imagenet_one_stage_cpu"
    data_flags = [f"--dataset=folder:{folder}"]
    result = run_to_completion(
        [
            "--flagfile=train/configs/imagenet_one_stage_cpu.cfg",
            *data_flags,
            f"--model_dir={model_dir}",
            "--deterministic",
            "--progress=false",
        ],
        timeout=3000,
    )
    summary = last_json(result)
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    search = [r for r in rows if r["phase"] == "search"]
    train = [r for r in rows if r["phase"] == "train"]
    assert 1 <= len(search) <= 3 and len(train) == 2
    # The search warms up over 1 epoch (lr 0.05 from the first), then the retraining's
    # schedule: 1 warm-up epoch, then a linear decay.
    assert all(r["lr"] == pytest.approx(0.05) for r in search)
    assert [r["lr"] for r in train] == pytest.approx([0.05, 0.05])
    # Both limits are checked every epoch of the search; the network is ImageNet-shaped.
    assert all(r["candidate_multiply_adds"] < 600_000_000 for r in search if "z_distance" in r)
    assert all("multiply_adds" in r for r in search)
    dataset = json.loads((model_dir / "dataset.json").read_text())
    assert dataset["augmentation"] == "imagenet" and dataset["image_size"] == [224, 224]
    assert summary["params"] == search[-1]["params"]
    assert summary["multiply_adds"] == search[-1]["multiply_adds"]
    assert summary["test_examples"] == CLASSES * TEST_PER_CLASS
    keras_spec = json.loads(
        (
            model_dir / "export" / "istanas" / "1" / "assets.extra" / "keras" / "network.json"
        ).read_text()
    )
    assert keras_spec["kind"] == "imagenet"

    # The SavedModel (fed raw pixels) and the run directory give the reported accuracy.
    assert_evaluations_match(
        summary, model_dir, data_flags, examples=CLASSES * TEST_PER_CLASS, tolerance=1e-9
    )

    # The found genotype at the ImageNet network's size (the closing note of issue 14).
    described = run_main(
        [
            "--mode=describe",
            f"--genotype={model_dir / 'genotype.json'}",
            "--dataset=imagenet",
            "--init_channels=48",
            "--layers=14",
            "--bn_after_param_free_ops",
        ],
        timeout=600,
    )
    assert described.returncode == 0, described.stderr[-2000:]
    sizes = last_json(described)
    assert (sizes["network"], sizes["channels"], sizes["layers"]) == ("imagenet", 48, 14)
    assert sizes["genotype"] == summary["genotype"]
    assert sizes["params"] > summary["params"] and sizes["multiply_adds"] > 0
