"""Offline shard writer: WebDataset layout, atomic shards + manifest, resume after a kill."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from generator_service.config import GeneratorConfig
from generator_service.shards import MANIFEST_NAME, ShardError, ShardWriter, read_manifest, temp_name
from protocol import Group
from protocol.shards import ShardIndex, index_name, scan_ranges

CONFIG = GeneratorConfig(backend="procedural", images_per_group=3, save_size=8)
FINGERPRINT = CONFIG.fingerprint()


def make_group(caption_id: int, m: int = 3, size: int = 8) -> Group:
    rng = np.random.default_rng(caption_id)
    images = rng.integers(0, 256, size=(m, size, size, 3), dtype=np.uint8)
    return Group(
        group_id=f"{FINGERPRINT[:8]}-{caption_id:09d}",
        caption_id=caption_id,
        caption=f"caption number {caption_id}",
        seeds=[1000 * caption_id + j for j in range(m)],
        images=images,
        generator=FINGERPRINT,
        gen_seconds=0.5,
    )


def writer(out, **kwargs) -> ShardWriter:
    kwargs.setdefault("shard_size", 2)
    return ShardWriter(out, CONFIG, **kwargs)


def test_shards_read_back_with_webdataset_and_tarfile(tmp_path):
    with writer(tmp_path) as w:
        for cid in range(5):
            w.write(make_group(cid))
    manifest = read_manifest(tmp_path)
    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.groups for s in manifest.shards] == [2, 2, 1]
    assert [s.images for s in manifest.shards] == [6, 6, 3]
    assert manifest.fingerprint == FINGERPRINT and manifest.generator == CONFIG.welcome_info()
    assert manifest.generator_config == CONFIG.to_dict() and manifest.save_size == 8
    assert not list(tmp_path.glob(".shard-*"))

    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
    key = make_group(0).group_id
    assert names[:5] == [f"{key}.txt", f"{key}.json", f"{key}.0.png", f"{key}.1.png", f"{key}.2.png"]

    urls = [str(tmp_path / s.name) for s in manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [make_group(c).group_id for c in range(5)]
    for sample in samples:
        header = json.loads(sample["json"])
        expected = make_group(header["caption_id"])
        assert sample["txt"].decode() == expected.caption
        assert header["seeds"] == expected.seeds
        assert header["shape"] == [3, 8, 8, 3] and header["encoding"] == "png"
        for j in range(3):
            decoded = np.asarray(Image.open(io.BytesIO(sample[f"{j}.png"])))
            np.testing.assert_array_equal(decoded, expected.images[j])


@pytest.mark.parametrize("fmt,ext", [("jpg", "jpg"), ("webp", "webp")])
def test_lossy_formats(tmp_path, fmt, ext):
    with writer(tmp_path, image_format=fmt, quality=90) as w:
        w.write(make_group(7, size=32))
    sample = next(iter(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False)))
    image = np.asarray(Image.open(io.BytesIO(sample[f"0.{ext}"])))
    assert image.shape == (32, 32, 3)
    assert json.loads(sample["json"])["encoding"] == {"jpg": "jpeg", "webp": "webp"}[fmt]


def test_resume_recovers_the_complete_groups_of_the_open_shard_and_drops_a_torn_tail(tmp_path):
    w = writer(tmp_path, shard_size=4).open()
    for cid in range(6):
        w.write(make_group(cid))
    # A kill: the open shard (groups 4, 5) stays a temp file, the lock dies with the process, and
    # the write of group 6 was cut after its caption and half its header.
    w._release_lock()
    with open(tmp_path / temp_name(1), "ab") as torn:
        info = tarfile.TarInfo(f"{FINGERPRINT[:8]}-000000006.txt")
        info.size = 9
        torn.write(info.tobuf(format=tarfile.USTAR_FORMAT) + b"caption 6" + b"\0" * 503)
        torn.write(tarfile.TarInfo(f"{FINGERPRINT[:8]}-000000006.json").tobuf(format=tarfile.USTAR_FORMAT)[:300])

    resumed = writer(tmp_path, shard_size=4).open()
    assert not (tmp_path / temp_name(1)).exists()
    assert resumed.done_caption_ids == {0, 1, 2, 3, 4, 5}
    for cid in range(8):
        if cid not in resumed.done_caption_ids:
            resumed.write(make_group(cid))
    resumed.close()
    manifest = read_manifest(tmp_path)
    assert [s.caption_ids for s in manifest.shards] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    samples = list(wds.WebDataset([str(tmp_path / s.name) for s in manifest.shards], shardshuffle=False))
    assert sorted(json.loads(s["json"])["caption_id"] for s in samples) == list(range(8))
    assert all(len([k for k in s if k.endswith("png")]) == 3 for s in samples)
    # the recovered shard got its sample index too: the same ranges a scan of it finds
    recovered = tmp_path / manifest.shards[1].name
    index = ShardIndex.from_bytes((tmp_path / index_name(recovered.name)).read_bytes(), "idx")
    with open(recovered, "rb") as handle:
        assert np.array_equal(index.ranges, scan_ranges(handle, recovered.stat().st_size)[0]) and index.count == 2


def test_renamed_but_unlisted_shard_is_adopted(tmp_path):
    with writer(tmp_path) as w:
        for cid in range(4):
            w.write(make_group(cid))
    # A kill between the rename and the manifest update: the manifest lacks the last shard.
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["shards"] = manifest["shards"][:1]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    resumed = writer(tmp_path).open()
    assert resumed.done_caption_ids == {0, 1, 2, 3}
    resumed.write(make_group(4))
    resumed.close()
    names = [s.name for s in read_manifest(tmp_path).shards]
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_fingerprint_mismatch_names_directory_and_both_fingerprints(tmp_path):
    with writer(tmp_path) as w:
        w.write(make_group(0))
    other_config = CONFIG.replace(save_size=16)
    other = ShardWriter(tmp_path, other_config, shard_size=2)
    with pytest.raises(ShardError) as info:
        other.open()
    message = str(info.value)
    assert str(tmp_path) in message and FINGERPRINT in message and other_config.fingerprint() in message


def test_second_writer_on_same_directory_is_refused(tmp_path):
    with writer(tmp_path):
        with pytest.raises(ShardError, match="another process"):
            writer(tmp_path).open()


def test_duplicate_group_is_written_once(tmp_path):
    with writer(tmp_path, shard_size=10) as w:
        w.write(make_group(1))
        w.write(make_group(1))
    assert read_manifest(tmp_path).shards[0].groups == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image format"):
        writer(tmp_path, image_format="gif")
    with pytest.raises(ValueError, match="shard_size"):
        writer(tmp_path, shard_size=0)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardError, match="manifest"):
        writer(tmp_path).open()
