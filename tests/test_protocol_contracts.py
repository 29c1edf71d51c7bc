"""The two generator<->trainer contracts in protocol/: the generator description and the shard layout."""
from __future__ import annotations

import json

import msgpack
import pytest

from generator_service.config import GeneratorConfig
from generator_service.shards import ShardWriter
from protocol import GeneratorInfo, ProtocolError, Welcome, decode, encode
from protocol.shards import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ShardLayoutError,
    group_members,
    read_manifest,
    scan_shard,
    split_member,
)
from tests.train_helpers import make_group
from trainer.data.sources.offline_layout import resolve_data

INFO = GeneratorConfig(backend="procedural", images_per_group=4, save_size=16).welcome_info()


def _welcome_frames(generator: object) -> list[bytes]:
    header = {"v": 1, "type": "welcome", "service": "svc", "generator": generator, "heartbeat_ms": 100}
    return [msgpack.packb(header, use_bin_type=True)]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"save_size": None}, "save_size"),
        ({"save_size": 0}, "save_size"),
        ({"images_per_group": "4"}, "images_per_group"),
        ({"images_per_group": True}, "images_per_group"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"steps": -1}, "steps"),
        ({"extra": {"nested": {"a": 1}}}, "extra"),
    ],
)
def test_bad_generator_description_is_a_bad_message_naming_the_field(change, field):
    wire = {**INFO.to_wire(), **change}
    if change.get(field, 0) is None:
        wire.pop(field)
    with pytest.raises(ProtocolError) as info:
        decode(_welcome_frames(wire))
    assert info.value.code == "bad_message" and field in info.value.message


def test_generator_description_round_trips_with_extra_fields():
    info = GeneratorInfo(**{**INFO.to_wire(), "extra": {"recipe": "paper", "lora_scale": 0.5}})
    welcome = decode(encode(Welcome("svc", info, 100)))
    assert welcome.generator == info and welcome.generator.extra == {"recipe": "paper", "lora_scale": 0.5}
    with pytest.raises(ProtocolError, match="must be (a )?map"):
        decode(_welcome_frames("not a map"))


def test_member_names_follow_the_webdataset_key_rule():
    names = group_members("abc-000000001", 3, "png")
    assert names == ["abc-000000001.txt", "abc-000000001.json", "abc-000000001.0.png",
                     "abc-000000001.1.png", "abc-000000001.2.png"]
    assert [split_member(n) for n in names[1:3]] == [("abc-000000001", "json"), ("abc-000000001", "0.png")]
    assert split_member("dir/key.7.jpg") == ("dir/key", "7.jpg")


def test_manifest_written_by_the_generator_is_read_by_the_trainer(tmp_path):
    config = GeneratorConfig(backend="procedural", images_per_group=4, save_size=16)
    with ShardWriter(tmp_path, config, shard_size=3, run={"seed": 5}) as writer:
        for caption_id in range(7):
            writer.write(make_group(caption_id, 4, 16))
    manifest = read_manifest(tmp_path)
    assert manifest.version == MANIFEST_VERSION and manifest.generator == config.welcome_info()
    assert [s.groups for s in manifest.shards] == [3, 3, 1] and manifest.run == {"seed": 5}
    assert scan_shard(tmp_path / manifest.shards[0].name) == manifest.shards[0]
    resolved = resolve_data([str(tmp_path)])
    assert resolved.image_size == 16 and [p.expected_groups for p in resolved.parts] == [3, 3, 1]


def test_version_1_manifest_is_still_read(tmp_path):
    version_1 = {"version": 1, "generator": {"backend": "procedural", "save_size": 24}, "fingerprint": "fp",
                 "seed": 3, "shards": [{"name": "shard-000000.tar", "groups": 2, "images": 4, "caption_ids": [0, 1]}]}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(version_1))
    manifest = read_manifest(tmp_path)
    assert manifest.version == 1 and manifest.generator is None and manifest.save_size == 24
    assert manifest.run == {"seed": 3} and manifest.shards[0].caption_ids == [0, 1]


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "cannot read"),
        (json.dumps({"version": 7, "shards": []}), "unsupported manifest version 7"),
        (json.dumps({"version": True, "shards": []}), "unsupported manifest version"),
        (json.dumps({"version": 2, "fingerprint": "x", "shards": [{"name": "../../etc/passwd", "groups": 1,
                                                                    "images": 1}]}), r"shards\[0\]"),
        (json.dumps({"version": 2, "fingerprint": "x", "generator": {"backend": "p"}, "shards": []}),
         "generator is missing field"),
    ],
)
def test_malformed_manifest_names_the_file_and_the_problem(tmp_path, content, match):
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ShardLayoutError, match=match) as info:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)
