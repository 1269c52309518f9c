"""The real download path against a loopback HTTP mirror, the cache, and the 'auto' fallback to the sample."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from data_helpers import Mirror, dead_port, gz_files, tiny_arrays

from mnist_flow.data import datasets as data
from mnist_flow.data.datasets import DataFallbackWarning, load_dataset
from mnist_flow.errors import DataError

NAMES = [f"{base}.gz" for base in data.FILES.values()]


def _raw_dir(cache: Path, name: str = "mnist") -> Path:
    return cache / name / "raw"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part")) if folder.exists() else []


def test_download_fills_the_cache_and_the_next_load_uses_it_without_http(mirror: Mirror, tmp_path: Path) -> None:
    first = load_dataset("mnist", "download", cache_dir=tmp_path, mirrors=[mirror.good()])
    assert first.source == "download" and first.origin == mirror.good()
    assert sorted(mirror.requests) == sorted(f"/good/{n}" for n in NAMES)
    for name in NAMES:
        assert (_raw_dir(tmp_path) / name).read_bytes() == mirror.files[name]
    assert first.train_images.shape == (30, 28, 28) and first.test_labels.shape == (10,)
    assert _leftovers(tmp_path) == []

    second = load_dataset("mnist", "download", cache_dir=tmp_path, mirrors=[mirror.good()])
    assert second.source == "cache" and second.origin == str(_raw_dir(tmp_path))
    assert len(mirror.requests) == 4
    assert second.fingerprint == first.fingerprint


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cached_file_is_moved_aside_and_fetched_again(mirror: Mirror, tmp_path: Path, damage: str) -> None:
    first = load_dataset("mnist", "auto", cache_dir=tmp_path, mirrors=[mirror.good()])
    cached = _raw_dir(tmp_path) / "train-labels-idx1-ubyte.gz"
    bad = b"garbage" if damage == "garbage" else cached.read_bytes()[:-8]
    cached.write_bytes(bad)

    again = load_dataset("mnist", "auto", cache_dir=tmp_path, mirrors=[mirror.good()])
    assert again.source == "download" and again.fingerprint == first.fingerprint
    assert (cached.parent / "train-labels-idx1-ubyte.gz.corrupt").read_bytes() == bad
    assert cached.read_bytes() == mirror.files[cached.name]
    assert mirror.requests.count("/good/train-labels-idx1-ubyte.gz") == 2 and len(mirror.requests) == 5


def test_failing_mirrors_fall_through_to_the_next_one(mirror: Mirror, tmp_path: Path) -> None:
    mirrors = [f"{mirror.url}/missing/", f"{mirror.url}/wrong/", mirror.good()]
    bundle = load_dataset("mnist", "download", cache_dir=tmp_path, mirrors=mirrors)
    assert bundle.source == "download" and bundle.origin == mirror.good()
    assert [p for p in mirror.requests if p.endswith(NAMES[0])] == [f"/missing/{NAMES[0]}", f"/wrong/{NAMES[0]}",
                                                                     f"/good/{NAMES[0]}"]
    assert _leftovers(tmp_path) == []


def test_unreachable_mirrors_give_a_data_error_naming_the_urls_and_leave_nothing(
    mirror: Mirror, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{dead_port()}/x/"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "download", cache_dir=tmp_path, mirrors=[dead, f"{mirror.url}/wrong/"], timeout=5)
    message = info.value.message
    assert f"{dead}train-images-idx3-ubyte.gz" in message
    # the wrong bytes are refused from their first bytes (not gzip), before the whole body is read
    assert f"{mirror.url}/wrong/train-images-idx3-ubyte.gz (not gzip data: expected magic 1f8b" in message
    assert "/tv/train-images-idx3-ubyte.gz" in message  # torchvision's (patched) mirrors are tried last
    assert info.value.fix and "source='dir'" in info.value.fix
    assert not (_raw_dir(tmp_path) / NAMES[0]).exists() and _leftovers(tmp_path) == []


def test_auto_falls_back_to_the_sample_with_a_warning_when_downloads_fail(
    mirror: Mirror, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{dead_port()}/"
    with pytest.warns(DataFallbackWarning, match=r"Could not load the full MNIST .*127\.0\.0\.1.*bundled 5,000-digit"):
        bundle = load_dataset("mnist", "auto", cache_dir=tmp_path, mirrors=[dead], timeout=5)
    assert bundle.source == "sample" and bundle.train_images.shape == (4000, 28, 28)
    assert any("5,000-digit" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_auto_for_fashion_mnist_has_no_sample_to_fall_back_to(mirror: Mirror, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Could not download"):
        load_dataset("fashion-mnist", "auto", cache_dir=tmp_path, mirrors=[f"http://127.0.0.1:{dead_port()}/"])


def test_cached_file_with_right_md5_but_bad_content_is_not_trusted(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mirror whose files pass md5 yet are not IDX images: the loader must still refuse them.
    broken = dict(mirror.files)
    broken[NAMES[0]] = gz_files(tiny_arrays())[NAMES[1]]  # a labels file where images belong
    md5s = {name: hashlib.md5(body).hexdigest() for name, body in broken.items()}
    monkeypatch.setattr(data, "_torchvision_resources", lambda name: md5s)
    mirror.files.update(broken)
    with pytest.raises(DataError, match="wrong IDX magic for images"):
        load_dataset("mnist", "download", cache_dir=tmp_path, mirrors=[mirror.good()])
