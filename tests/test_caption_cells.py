"""Caption cells (hard negatives): captions of a cell differ from its anchor in exactly one word."""
import numpy as np
import pytest

from generator_service.procedural.grammar import all_captions
from trainer.data.caption_cells import caption_words, select_cells
from protocol import Group
from trainer.config import ConfigError, build_config
from trainer.data.config import ReplayConfig
from trainer.data.replay import ReplayBuffer


def differing_positions(a: str, b: str) -> list[int]:
    wa, wb = caption_words(a), caption_words(b)
    assert len(wa) == len(wb), (a, b)
    return [i for i, (x, y) in enumerate(zip(wa, wb)) if x != y]


def test_caption_words_drop_articles_and_punctuation():
    assert caption_words("An orange star, with dots on a light background.") == (
        "orange", "star", "with", "dots", "on", "light", "background")


def test_cells_hold_one_word_neighbours_of_their_anchor():
    captions = all_captions()
    rng = np.random.default_rng(0)
    positions = set()
    for _ in range(20):
        cells = select_cells(captions, 36, 6, rng)
        flat = [i for cell in cells for i in cell]
        assert 34 <= len(flat) <= 36 and len(set(flat)) == len(flat)  # a last cell needs >= 2 slots
        for anchor, *others in cells:
            assert others, "a cell without a neighbour"
            varying = {tuple(differing_positions(captions[anchor], captions[o])) for o in others}
            assert len(varying) == 1 and len(next(iter(varying))) == 1, (captions[anchor], varying)
            positions |= varying
    # colour, shape, texture and background positions all get cells
    assert positions == {(0,), (1,), (3,), (5,)}


def test_vary_words_limit_cells_to_those_words():
    from generator_service.procedural.grammar import SHAPES, TEXTURES
    captions = all_captions()
    rng = np.random.default_rng(0)
    vary = set(SHAPES) | set(TEXTURES)
    positions = set()
    for _ in range(20):
        for anchor, *others in select_cells(captions, 36, 6, rng, vary_words=vary):
            for other in others:
                (position,) = differing_positions(captions[anchor], captions[other])
                assert caption_words(captions[other])[position] in vary
                positions.add(position)
    assert positions == {1, 3}  # shape and texture only, never colour or background
    assert select_cells(captions, 36, 6, rng, vary_words={"zebra"}) == []


def test_captions_without_neighbours_give_no_cells():
    rng = np.random.default_rng(0)
    assert select_cells(["a red circle", "two blue dogs running", "the sky"], 3, 4, rng) == []
    with pytest.raises(ValueError, match="cell_size"):
        select_cells(["a b"], 2, 1, rng)


def _buffer_of_procedural_groups(hard_fraction: float, n: int = 200, cell_words=()) -> ReplayBuffer:
    buffer = ReplayBuffer(n, 2, 4, 4, policy=ReplayConfig(hard_fraction=hard_fraction, cell_size=6, cell_words=cell_words),
                          seed=1)
    for caption_id, caption in enumerate(all_captions()[:: 576 // n][:n]):
        images = np.full((2, 4, 4, 3), caption_id % 256, dtype=np.uint8)
        buffer.add(Group(group_id=f"g{caption_id}", caption_id=caption_id, caption=caption,
                         seeds=[0, 1], images=images))
    return buffer


def neighbour_pairs(captions: list[str]) -> int:
    return sum(len(differing_positions(a, b)) == 1 for i, a in enumerate(captions) for b in captions[i + 1:])


def test_replay_hard_batches_are_made_of_cells_and_uniform_ones_are_not():
    hard, uniform = _buffer_of_procedural_groups(1.0), _buffer_of_procedural_groups(0.0)
    hard_pairs, uniform_pairs = 0, 0
    for _ in range(10):
        batch = hard.sample(24, 2, timeout=5)
        assert len(set(batch.caption_ids.tolist())) == 24
        assert all(int(c) % 256 == int(img[0, 0, 0, 0]) for c, img in zip(batch.caption_ids, batch.images))
        hard_pairs += neighbour_pairs(batch.captions)
        uniform_pairs += neighbour_pairs(uniform.sample(24, 2, timeout=5).captions)
    # each cell of k captions gives k(k-1)/2 one-word pairs; uniform batches of 24 out of 200 give few
    assert hard_pairs > 3 * uniform_pairs and hard_pairs >= 10 * 24
    assert hard.stats()["hard_batches"] == 10 and uniform.stats()["hard_batches"] == 0


def test_replay_cells_vary_only_the_cell_words():
    buffer = _buffer_of_procedural_groups(1.0, cell_words=["Circle", "square", "triangle", "hexagon", "star", "cross"])
    shape_pairs, other_pairs = 0, 0
    for _ in range(10):
        captions = buffer.sample(24, 2, timeout=5).captions
        for i, a in enumerate(captions):
            for b in captions[i + 1:]:
                differing = differing_positions(a, b)
                shape_pairs += differing == [1]
                other_pairs += len(differing) == 1 and differing != [1]
    # the cells vary the shape word only; one-word pairs elsewhere come from the uniform filler alone
    assert shape_pairs >= 5 * 10 and other_pairs * 5 < shape_pairs, (shape_pairs, other_pairs)


ONLINE = {"generators": ["tcp://127.0.0.1:5555"]}


def test_hard_negative_settings_are_validated():
    with pytest.raises(ConfigError, match="replay.hard_fraction"):
        build_config(overrides={"data": ONLINE, "replay": {"hard_fraction": 1.5}})
    with pytest.raises(ConfigError, match="replay.cell_size"):
        build_config(overrides={"data": ONLINE, "replay": {"cell_size": 1}})
    with pytest.raises(ConfigError, match="replay.cell_words"):
        build_config(overrides={"data": ONLINE, "replay": {"cell_words": ["two words"]}})
