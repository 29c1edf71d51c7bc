"""Shard sample indexes: written by the ShardWriter with every shard, read by the trainer without a
tar scan; tars without one are scanned once and cached (beside them or in --index-cache), and a
stale or corrupt cache is refused with a warning and rebuilt."""
from __future__ import annotations

import logging
import os
import tarfile

import numpy as np
import pytest

from protocol.shards import ShardIndex, ShardLayoutError, index_name
from tests.test_offline_source import S, add_member, encode, read_groups, write_generator_dir
from trainer.data.sources import offline_index
from trainer.data.sources.offline import OfflineSource
from trainer.data.sources.offline_index import build_index, cache_name, count_groups
from trainer.data.sources.offline_layout import resolve_data


@pytest.fixture
def scans(monkeypatch):
    """Counts the tar scans (the real scan runs)."""
    calls: list[str] = []
    real = offline_index._scan_tar

    def counted(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(offline_index, "_scan_tar", counted)
    return calls


def test_writer_commits_an_index_equal_to_a_scan(tmp_path, scans):
    out = tmp_path / "out"
    ids = write_generator_dir(out, shards=3, per_shard=4, m=2)
    for k in range(3):
        tar = out / f"shard-{k:06d}.tar"
        written = ShardIndex.from_bytes((out / index_name(tar.name)).read_bytes(), "idx")
        assert written.tar_bytes == tar.stat().st_size and written.identity == "" and written.count == 4
        scanned, damaged = offline_index._scan_tar(str(tar), tar.stat().st_size)
        assert not damaged and np.array_equal(written.ranges, scanned)
    scans.clear()
    source = OfflineSource(str(out), captions_per_rank=4, draw_per_caption=2, num_workers=0, seed=1)
    assert scans == []  # the committed indexes are used: no tar is scanned
    assert sorted(read_groups(source, 3)) == ids
    assert count_groups(str(out)) == 12 and source.index.count == 12
    assert source.index.nbytes <= 24 * 12 + 8 * 4  # 12 bytes per group + the part offsets


def _plain_tars(root, shards=2, per_shard=3):
    keys = []
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as archive:
            for k in range(per_shard):
                key = f"{s:05d}{k:04d}"
                keys.append(key)
                add_member(archive, f"{key}.png", encode(100 + k))
                add_member(archive, f"{key}.txt", f"photo {key}".encode())
    return keys


def test_unindexed_tars_are_scanned_once_and_cached_beside(tmp_path, scans, caplog):
    keys = _plain_tars(tmp_path)
    pattern = str(tmp_path / "{00000..00001}.tar")
    resolved = resolve_data(pattern)
    first = build_index(resolved.parts, resolved.tables)
    assert len(scans) == 2 and (tmp_path / "00000.tar.idx").is_file()
    cached = ShardIndex.from_bytes((tmp_path / "00000.tar.idx").read_bytes(), "cache")
    assert cached.identity.startswith("mtime:")
    second = build_index(resolved.parts, resolved.tables)
    assert len(scans) == 2  # served from the cache
    assert np.array_equal(first.starts, second.starts) and second.count == len(keys)

    # a rewritten tar (other mtime) makes its cache stale: refused with the file named, rebuilt
    os.utime(tmp_path / "00001.tar", ns=(1, 1))
    with caplog.at_level(logging.WARNING, logger="trainer.data.sources.offline"):
        build_index(resolved.parts, resolved.tables)
    assert scans[2:] == [str(tmp_path / "00001.tar")]
    assert "00001.tar.idx: cached for mtime:" in caplog.text

    # a corrupt cache (ranges past the end of the tar) is refused and rebuilt
    bad = ShardIndex(10**9, np.array([[0, 10**9]], dtype=np.int64), cached.identity).to_bytes()
    (tmp_path / "00000.tar.idx").write_bytes(bad[:-3])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.data.sources.offline"):
        third = build_index(resolved.parts, resolved.tables)
    assert "00000.tar.idx: shard index holds" in caplog.text and len(scans) == 4
    assert np.array_equal(third.starts, first.starts)
    with pytest.raises(ShardLayoutError, match="past the tar's"):
        ShardIndex.from_bytes(ShardIndex(100, np.array([[0, 200]], dtype=np.int64)).to_bytes(), "x")


def test_read_only_folder_uses_the_index_cache(tmp_path, scans):
    data = tmp_path / "data"
    data.mkdir()
    _plain_tars(data)
    data.chmod(0o555)
    try:
        if os.access(data, os.W_OK):
            pytest.skip("running as a user that writes into read-only folders")
        cache = tmp_path / "cache"
        pattern = str(data / "{00000..00001}.tar")
        source = OfflineSource(pattern, captions_per_rank=2, draw_per_caption=1, num_workers=0, index_cache=str(cache))
        assert len(scans) == 2 and sorted(os.listdir(cache)) == sorted(
            cache_name(str(data / f"{s:05d}.tar")) for s in range(2))
        OfflineSource(pattern, captions_per_rank=2, draw_per_caption=1, num_workers=0, index_cache=str(cache))
        assert len(scans) == 2
        assert source.next_batch().images.shape == (2, 1, S, S, 3)
    finally:
        data.chmod(0o755)


def test_index_cache_folder_for_a_writable_folder_too(tmp_path, scans):
    (tmp_path / "d").mkdir()
    _plain_tars(tmp_path / "d")
    cache = tmp_path / "cache"
    count = count_groups(str(tmp_path / "d" / "{00000..00001}.tar"), index_cache=str(cache))
    assert count == 6 and len(scans) == 2 and len(os.listdir(cache)) == 2
    assert not list((tmp_path / "d").glob("*.idx"))  # nothing written beside the tars


def test_samples_with_long_member_names_are_read_through_tarfile(tmp_path):
    long_key = "k" * 120  # longer than a USTAR name field: a GNU / pax header
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"long-{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as archive:
            add_member(archive, f"{long_key}.png", encode(7))
            add_member(archive, f"{long_key}.txt", b"long")
            add_member(archive, "short.png", encode(9))
            add_member(archive, "short.txt", b"short")
        source = OfflineSource(str(path), captions_per_rank=2, draw_per_caption=1, num_workers=0, image_size=S,
                               shuffle=False)
        batch = source.next_batch()
        assert batch.captions == ["long", "short"]
        assert batch.images[:, 0, 0, 0, 0].tolist() == [7, 9]
