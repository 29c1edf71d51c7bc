"""OfflineSource: generator shards, plain WebDataset shards, the official layout; epochs, ranks,
resume and corrupt data. Generator shards are written by the generator's real ShardWriter; plain
WebDataset and official-layout data are written here as img2dataset and the official scripts do."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generator_service.config import GeneratorConfig
from generator_service.shards import ShardWriter
from protocol import Group
from trainer.data.sources import build_source
from trainer.data.sources.caption_ids import namespaced_caption_id
from trainer.data.sources.offline import OfflineSource
from trainer.data.sources.offline_reader import key_caption_id

S = 8  # image side in these tests


def pixel(caption_id: int, index: int) -> int:
    return (caption_id * 8 + index) % 256


def encode(value: int, fmt: str = "PNG", size: tuple[int, int] = (S, S)) -> bytes:
    image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    image[..., 0] = value
    image[..., 1] = 255 - value
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_generator_dir(root: Path, shards: int, per_shard: int, m: int,
                        bad_image: tuple[int, int] | None = None) -> list[int]:
    """Generator shards written by the generator's real ``ShardWriter``; image ``i`` of caption ``cid``
    has the pixel value ``pixel(cid, i)``, and ``bad_image=(cid, i)`` gets garbage bytes instead."""
    config = GeneratorConfig(backend="procedural", images_per_group=m, save_size=S)
    ids = list(range(shards * per_shard))
    with ShardWriter(root, config, shard_size=per_shard) as writer:
        for cid in ids:
            encoded = [b"not a png at all" if bad_image == (cid, i) else encode(pixel(cid, i)) for i in range(m)]
            writer.write(Group(group_id=f"fp000000-{cid:09d}", caption_id=cid, caption=f"caption {cid}",
                               seeds=list(range(m)), encoded=encoded, encoding="png", shape=(m, S, S, 3),
                               generator=config.fingerprint(), gen_seconds=0.1))
    return ids


def check_pixels(batch, m: int) -> None:
    """Every image belongs to its group's caption, and a group's images are distinct when m allows."""
    for g, cid in enumerate(batch.caption_ids.tolist()):
        values = batch.images[g, :, 0, 0, 0].tolist()
        assert all(v // 8 == cid % 32 and v % 8 < m for v in values), (cid, values)
        if batch.images.shape[1] <= m:
            assert len(set(values)) == len(values)


def read_groups(source: OfflineSource, batches: int) -> list[int]:
    return [cid for _ in range(batches) for cid in source.next_batch().caption_ids.tolist()]


def test_generator_shards_each_group_once_per_epoch(tmp_path):
    ids = write_generator_dir(tmp_path / "out", shards=4, per_shard=5, m=4)
    source = OfflineSource(str(tmp_path / "out"), captions_per_rank=4, draw_per_caption=2, num_workers=0, seed=1)
    assert source.image_size == S  # from the manifest's generator config
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(5):
            batch = source.next_batch()
            assert batch.images.shape == (4, 2, S, S, 3) and batch.images.dtype == torch.uint8
            assert batch.caption_ids.dtype == torch.int64
            assert batch.captions == [f"caption {c}" for c in batch.caption_ids.tolist()]
            check_pixels(batch, m=4)
            seen += batch.caption_ids.tolist()
        assert sorted(seen) == ids
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    source.next_batch()
    stats = source.stats()
    assert stats["epochs_completed"] == 2 and stats["skipped_corrupt"] == 0 and stats["groups"] == 44


def test_rank_split_disjoint_and_covering_with_workers(tmp_path):
    ids = write_generator_dir(tmp_path / "out", shards=4, per_shard=3, m=2)
    pattern = str(tmp_path / "out" / "shard-{000000..000003}.tar")
    per_rank = []
    for rank in range(2):
        source = OfflineSource(pattern, captions_per_rank=2, draw_per_caption=2, image_size=S, rank=rank,
                               world_size=2, num_workers=2, seed=3)
        per_rank.append(read_groups(source, 3))  # 2 shards x 3 groups per rank
        assert source.stats()["epoch"] == 0
        source.close()
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == ids


def test_resume_continues_the_epoch(tmp_path):
    ids = write_generator_dir(tmp_path / "out", shards=4, per_shard=5, m=2)
    first = OfflineSource(str(tmp_path / "out"), captions_per_rank=4, draw_per_caption=2, num_workers=2, seed=5)
    before = read_groups(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    first.close()
    resumed = OfflineSource(str(tmp_path / "out"), captions_per_rank=4, draw_per_caption=2, num_workers=2, seed=5)
    resumed.load_state_dict(state)
    after = read_groups(resumed, 3)
    assert sorted(before + after) == ids
    assert resumed.stats()["groups"] == 20
    resumed.close()


def test_plain_webdataset_shards(tmp_path):
    keys = []
    for s in range(2):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as archive:
            for k in range(3):
                key = f"{s:05d}{k:04d}"
                keys.append(key)
                size = (12, 10) if k % 2 else (S, 2 * S)  # not square: resized + center-cropped
                add_member(archive, f"{key}.jpg", encode(200, "JPEG", size))
                add_member(archive, f"{key}.txt", f"photo {key}".encode())
                add_member(archive, f"{key}.json", json.dumps({"key": key, "caption": f"photo {key}"}).encode())
    source = OfflineSource(str(tmp_path / "{00000..00001}.tar"), captions_per_rank=3, draw_per_caption=1,
                           image_size=S, num_workers=0)
    batches = [source.next_batch() for _ in range(2)]
    ids = [c for b in batches for c in b.caption_ids.tolist()]
    assert sorted(ids) == sorted(key_caption_id(k) for k in keys)
    assert all(0 <= c < 2**63 for c in ids)
    captions = {c: t for b in batches for c, t in zip(b.caption_ids.tolist(), b.captions)}
    assert all(captions[key_caption_id(k)] == f"photo {k}" for k in keys)
    for b in batches:
        assert b.images.shape == (3, 1, S, S, 3)
        assert abs(int(b.images[..., 0].float().mean()) - 200) <= 3
    # one image per sample cannot give two distinct positives: every sample is skipped, never repeated
    pairs = OfflineSource(str(tmp_path / "{00000..00001}.tar"), captions_per_rank=3, draw_per_caption=2,
                          image_size=S, num_workers=0)
    with pytest.raises(RuntimeError, match="6 with fewer images than draw_per_caption = 2"):
        pairs.next_batch()
    assert pairs.stats()["skipped_short"] == 6 and pairs.stats()["groups"] == 0


def test_official_layout_csv_and_seed_folders(tmp_path):
    rows = [f"{r // 3:05d}/{r:06d}.png" for r in range(6)]
    (tmp_path / "data.csv").write_text("path,caption\n" + "".join(f"{p},a caption number {r}\n" for r, p in enumerate(rows)))
    for seed in range(3):
        for r, relative in enumerate(rows):
            if seed == 2 and r == 4:
                continue  # one image missing in one seed folder: a group of 2
            path = tmp_path / f"seed{seed}" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(pixel(r, seed)))
    source = OfflineSource(str(tmp_path), captions_per_rank=5, draw_per_caption=3, num_workers=0, image_size=S,
                           rows_per_part=2)
    batch = source.next_batch()
    # row 4 has 2 images for a draw of 3: skipped and counted, never filled by repeating an image
    assert sorted(batch.caption_ids.tolist()) == [0, 1, 2, 3, 5]
    assert batch.captions == [f"a caption number {c}" for c in batch.caption_ids.tolist()]
    for g, row in enumerate(batch.caption_ids.tolist()):
        assert sorted(batch.images[g, :, 0, 0, 0].tolist()) == [pixel(row, s) for s in range(3)]
    assert source.stats()["skipped_short"] == 1
    by_csv = OfflineSource(str(tmp_path / "data.csv"), captions_per_rank=6, draw_per_caption=1, num_workers=0,
                           image_size=S, seed_dirs=[str(tmp_path / "seed1")])
    batch = by_csv.next_batch()
    assert sorted(batch.caption_ids.tolist()) == list(range(6))


def test_corrupt_image_truncated_and_unreadable_shards_are_skipped_and_counted(tmp_path):
    out = tmp_path / "out"
    write_generator_dir(out, shards=3, per_shard=4, m=2, bad_image=(1, 1))  # group 1 has a broken image
    # Truncate shard 2 in the middle of its third group: groups 8, 9 intact, 10 torn, 11 lost.
    shard = out / "shard-000002.tar"
    with tarfile.open(shard) as archive:
        members = {m.name: m for m in archive.getmembers()}
    cut = members["fp000000-000000010.1.png"].offset_data + 10
    shard.write_bytes(shard.read_bytes()[:cut])
    (out / "garbage.tar").write_bytes(b"this is not a tar archive" * 40)
    paths = [str(out), str(out / "garbage.tar")]
    source = OfflineSource(paths, captions_per_rank=3, draw_per_caption=2, num_workers=0, image_size=S, seed=2)
    # two inputs (the shard directory and garbage.tar): caption ids are namespaced by input
    namespace = source.parts[0].namespace
    survivors = sorted(namespaced_caption_id(namespace, c) for c in [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert sorted(read_groups(source, 3)) == survivors
    assert sorted(read_groups(source, 3)) == survivors  # next epoch: same survivors, no crash

    # Exact counts, with a fixed read order: shard 0 [0, 1 (bad), 2, 3], shard 1 [4..7],
    # shard 2 [8, 9, 10 (torn), 11 lost (the manifest lists 4 groups)]. Shard damage is found when the
    # index is built: group 11 lost and garbage.tar unreadable count once, at start.
    source = OfflineSource(paths, captions_per_rank=9, draw_per_caption=2, num_workers=0, image_size=S, shuffle=False)
    assert source.stats()["skipped_corrupt"] == 2 and source.stats()["corrupt_shards"] == 2  # 11, garbage.tar
    assert sorted(source.next_batch().caption_ids.tolist()) == survivors
    assert source.stats()["skipped_corrupt"] == 3  # + group 1
    assert sorted(source.next_batch().caption_ids.tolist()) == survivors
    stats = source.stats()
    # then group 10 (torn) ends epoch 0; epoch 1 up to group 9 skips group 1 again
    assert stats["skipped_corrupt"] == 5
    assert stats["corrupt_shards"] == 2  # shard 2 and garbage.tar
    assert stats["epochs_completed"] == 1


def test_missing_inputs_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        OfflineSource(str(tmp_path / "nowhere"), 2, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no manifest.json"):
        OfflineSource(str(tmp_path / "empty"), 2, 2)
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        OfflineSource(str(tmp_path / "missing.csv"), 2, 2)
    write_generator_dir(tmp_path / "out", shards=2, per_shard=2, m=2)
    with pytest.raises(FileNotFoundError, match=r"not found: .*shard-000002.tar.* and 1 more"):
        OfflineSource(str(tmp_path / "out" / "shard-{000000..000005}.tar"), 2, 2)
    (tmp_path / "out" / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-000001.tar is listed in .*manifest.json"):
        OfflineSource(str(tmp_path / "out"), 2, 2)


def test_registry_builds_the_offline_source(tmp_path):
    write_generator_dir(tmp_path / "out", shards=1, per_shard=2, m=2)
    source = build_source("offline", paths=[str(tmp_path / "out")], captions_per_rank=2, draw_per_caption=1,
                          num_workers=0)
    assert isinstance(source, OfflineSource)
    assert source.next_batch().images.shape == (2, 1, S, S, 3)
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        build_source("nope")


def test_the_config_picks_the_source_through_the_registry(tmp_path):
    from trainer.config import ConfigError, TrainConfig
    from trainer.data.config import DataConfig, ReplayConfig
    from trainer.data.sources import SOURCES, SourceContext, register_source, source_from_config

    write_generator_dir(tmp_path / "out", shards=1, per_shard=4, m=2)
    data = DataConfig(source="offline", data=[str(tmp_path / "out")], draw_per_caption=2, num_workers=0)
    source = source_from_config(data, ReplayConfig(), SourceContext(captions_per_rank=3, seed=1))
    assert isinstance(source, OfflineSource) and source.next_batch().images.shape == (3, 2, S, S, 3)

    @register_source("every-group-once")
    class EveryGroupOnce(OfflineSource):  # a source of its own name, built from the same groups
        @classmethod
        def from_config(cls, data, replay, context):
            return cls(data.data, captions_per_rank=context.captions_per_rank, draw_per_caption=1,
                       num_workers=0, shuffle=False)

    cfg = TrainConfig()
    cfg.data.source, cfg.schedule.steps = "every-group-once", 1
    try:
        assert cfg.validate().data.source == "every-group-once"
        built = source_from_config(DataConfig(source="every-group-once", data=[str(tmp_path / "out")]),
                                   ReplayConfig(), SourceContext(captions_per_rank=4))
        assert isinstance(built, EveryGroupOnce) and built.next_batch().images.shape == (4, 1, S, S, 3)
    finally:
        SOURCES.unregister("every-group-once")
    with pytest.raises(ConfigError, match="data.source = 'every-group-once': must be one of offline, online"):
        cfg.validate()


def test_short_groups_and_mixed_inputs_are_refused_at_start(tmp_path):
    write_generator_dir(tmp_path / "two", shards=1, per_shard=3, m=2)
    write_generator_dir(tmp_path / "three", shards=1, per_shard=3, m=3)
    with pytest.raises(ValueError, match=r"two stores 2 image\(s\) per group, fewer than draw_per_caption = 3"):
        OfflineSource(str(tmp_path / "two"), captions_per_rank=2, draw_per_caption=3, num_workers=0)
    both = [str(tmp_path / "two"), str(tmp_path / "three")]
    with pytest.raises(ValueError, match=r"two has images per group 2, .*three has 3 \(pass --allow-mixed-data"):
        OfflineSource(both, captions_per_rank=2, draw_per_caption=2, num_workers=0)
    mixed = OfflineSource(both, captions_per_rank=6, draw_per_caption=2, num_workers=0, allow_mixed=True)
    assert mixed.next_batch().images.shape == (6, 2, S, S, 3)
