"""How `mnist-flow predict` does on a model's own test images saved as PNG, against its registered accuracy.

    # the champion of MNIST_FLOW_HOME, on the data it was trained on (checked by fingerprint)
    .venv/bin/python scripts/predict_accuracy.py --dataset fashion-mnist --source dir \\
        --data-dir /usr/share/datasets/fashion-mnist
    # or a quick model trained here first (784-128-10, 3 epochs), in a temporary home
    .venv/bin/python scripts/predict_accuracy.py --dataset fashion-mnist --source dir \\
        --data-dir /usr/share/datasets/fashion-mnist --train

Prints JSON: the registered test accuracy; `predict` on every test image and on every 50th, saved
as PNG; the model's own accuracy on those every-50th images; how often `predict` agrees with the
model on them; the same every-50th images framed as MNIST digits (the behaviour before the sidecar
recorded the preparation), and as photos (dark on white, 2-5x larger, off-centre, some RGB/JPEG).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnist_flow import pipeline
from mnist_flow.params import TrainConfig
from mnist_flow.registry.store import Registry, load_model
from mnist_flow.review.predict import DIGIT, Preprocessing, predict_images
from mnist_flow.settings import Settings, load_settings


def _pngs(images: np.ndarray, folder: Path, step: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, len(images), step):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(images[i], mode="L").save(paths[-1], compress_level=1)
    return paths


def _photos(images: np.ndarray, folder: Path, paper: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, pixels in enumerate(images):
        scale = 2 + k % 4
        item = Image.fromarray(255 - pixels, mode="L").resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
        page = Image.new("L", (28 * scale + 60, 28 * scale + 30), paper)
        page.paste(item, (10 + 5 * (k % 7), 20))
        path = folder / f"{k}.{'jpg' if k % 3 == 0 else 'png'}"
        image = page.convert("RGB") if k % 2 else page
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def _accuracy(predictions: list[int], labels: np.ndarray) -> float:
    return round(float(np.mean(np.array(predictions) == labels)), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--source", default="sample")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--train", action="store_true", help="train a quick model in a temporary home first")
    parser.add_argument("--step", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings()
        params = pipeline.RunParams.parse(dataset=args.dataset, source=args.source, data_dir=args.data_dir)
        bundle = pipeline.load_data(params, settings)
        prepared = pipeline.prepare(bundle, val_fraction=0.1, seed=0, device="cpu")
        if args.train:
            settings = Settings(home=Path(tmp) / "home")
            config = TrainConfig(hidden=(128,), lr=0.1, momentum=0.9, batch_size=128, epochs=3, seed=0,
                                 schedule="onecycle", weight_decay=5e-4, precision="fp32").validate()
            model, history = pipeline.fit_best(prepared, config)
            with Registry.from_settings(settings) as registry:
                pipeline.register_and_decide(
                    registry,
                    pipeline.Candidate(prepared, model, config, history, pipeline.evaluate_test(model, prepared),
                                       study_name="predict-accuracy", trial_number=0, run_key="predict-accuracy",
                                       flow_run_id=None),
                    margin=0.0, alpha=0.05)
        loaded = load_model("champion", name=pipeline.model_name(bundle.name), settings=settings)
        if loaded.version.dataset_fingerprint != bundle.fingerprint:
            print(f"the champion was trained on other data (fingerprint {loaded.version.dataset_fingerprint[:16]}, "
                  f"these are {bundle.fingerprint[:16]})", file=sys.stderr)
            return 2
        images, labels = bundle.test_images.numpy(), bundle.test_labels.numpy()
        every = predict_images(_pngs(images, Path(tmp) / "all", 1), loaded.model, loaded.preprocessing)
        subset = [r["digit"] for r in every][::args.step]
        with torch.inference_mode():
            own = loaded.model(prepared.test_x[::args.step]).argmax(1).tolist()
        sub_labels = labels[::args.step]
        as_digits = Preprocessing(**{**loaded.preprocessing.__dict__, "preparation": DIGIT})
        big = [Image.fromarray(p, mode="L").resize((56, 56), Image.Resampling.BICUBIC) for p in images[::args.step]]
        framed = np.stack([as_digits.image(b) for b in big])
        with torch.inference_mode():
            digit_framing = loaded.model(loaded.preprocessing.features(framed)).argmax(1).tolist()
        photos = predict_images(_photos(images[::args.step], Path(tmp) / "photos", 255 if bundle.name != "mnist"
                                        else 235), loaded.model, loaded.preprocessing)
        print(json.dumps({
            "model": f"{loaded.version.name} v{loaded.version.version}", "preparation": loaded.preprocessing.preparation,
            "registered_test_accuracy": round(float(loaded.version.metrics["test_accuracy"]), 4),
            "predict_all_test_pngs": {"n": len(every), "accuracy": _accuracy([r["digit"] for r in every], labels)},
            "predict_every_nth_png": {"n": len(subset), "accuracy": _accuracy(subset, sub_labels),
                                      "model_on_same_images": _accuracy(own, sub_labels),
                                      "agreement_with_model": _accuracy(subset, np.array(own))},
            "every_nth_2x_framed_as_digits": _accuracy(digit_framing, sub_labels),
            "every_nth_as_photos": _accuracy([r["digit"] for r in photos], sub_labels),
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
