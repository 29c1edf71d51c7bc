"""The procedural backend: grammar, determinism, nuisance, visible semantics, CLI and probe folders."""

from __future__ import annotations

import time

import numpy as np
import pytest

from generator_service.backends import BACKENDS, create_backend, register_backend
from generator_service.backends.base import Backend
from generator_service.backends.facts import BackendFacts
from generator_service.captions import load_captions
from generator_service.config import GeneratorConfig
from generator_service.procedural import all_captions, attributes, make_caption, parse_caption, sample_captions
from generator_service.procedural.cli import main_captions
from generator_service.procedural.grammar import COLOURS, write_caption_file
from generator_service.procedural.probe_set import PROBE_SEED_OFFSET, write_probe_imagefolder
from generator_service.seeds import image_seed

CAPTION = "a red triangle with stripes on a dark background"


@pytest.fixture(scope="module")
def backend():
    return create_backend(GeneratorConfig(images_per_group=4))


def test_grammar_size_and_round_trip():
    captions = all_captions()
    assert [len(v) for v in attributes.values()] == [8, 6, 4, 3]
    assert len(captions) == len(set(captions)) == 576
    for caption in captions[::7]:
        assert make_caption(**parse_caption(caption)) == caption


def test_parse_is_lenient_about_case_space_articles_and_period():
    expected = {"colour": "orange", "shape": "star", "texture": "dots", "background": "light"}
    assert parse_caption("  An ORANGE star   with dots on a light background.") == expected
    assert parse_caption("a orange star with dots on an light background") == expected


@pytest.mark.parametrize(
    "caption, message",
    [
        ("a photo of a dog", r"caption 'a photo of a dog' does not follow the procedural grammar"),
        ("a red blob with stripes on a dark background", r"unknown shape 'blob'; known shapes: circle, square"),
        ("a teal circle with dots on a dark background", r"unknown colour 'teal'"),
        ("a red circle with dots on a pink background", r"unknown background 'pink'"),
    ],
)
def test_parse_errors_name_the_caption(caption, message):
    with pytest.raises(ValueError, match=message):
        parse_caption(caption)


def test_sample_captions():
    first = sample_captions(576, seed=1)
    assert len(set(first)) == 576 and first == sample_captions(576, seed=1)
    assert first != sample_captions(576, seed=2)
    assert sample_captions(1000, seed=1)[:576] == first


def test_shape_dtype_and_registry(backend):
    images = backend.generate([CAPTION, "a blue circle with dots on a light background"], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert images.shape == (2, 4, 64, 64, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
    assert {"procedural", "diffusers"} <= set(BACKENDS)


def test_same_caption_and_seed_give_the_same_image_whatever_the_batch(backend):
    alone = backend.generate([CAPTION], [[42]])[0, 0]
    in_batch = backend.generate(["a green cross with checks on a gradient background", CAPTION], [[7], [42]])[1, 0]
    again = create_backend(GeneratorConfig()).generate([CAPTION], [[42]])[0, 0]
    np.testing.assert_array_equal(alone, in_batch)
    np.testing.assert_array_equal(alone, again)


def _foreground_centroid(image: np.ndarray) -> np.ndarray:
    saturated = image.max(axis=-1).astype(int) - image.min(axis=-1) > 80
    ys, xs = np.nonzero(saturated)
    return np.array([ys.mean(), xs.mean()])


def test_seed_sets_the_nuisance_and_caption_the_semantics(backend):
    seeds = [image_seed(0, 5, j) for j in range(4)]
    group = backend.generate([CAPTION], [seeds])[0]
    # Different seeds: different images, and the shape moves (position is a nuisance).
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(group[a].astype(int) - group[b]).mean() > 3
    centroids = np.stack([_foreground_centroid(image) for image in group])
    assert np.ptp(centroids, axis=0).max() > 3
    # Same seed, other caption: different image.
    other = backend.generate(["a red triangle with stripes on a light background"], [seeds])[0]
    assert np.abs(other.astype(int) - group).mean() > 30


@pytest.mark.parametrize("colour", list(COLOURS))
def test_colour_is_visible(backend, colour):
    caption = make_caption(colour, "circle", "dots", "dark")
    images = backend.generate([caption], [[image_seed(1, 0, j) for j in range(4)]])[0].reshape(-1, 3).astype(float) / 255
    saturated = images[images.max(axis=1) - images.min(axis=1) > 0.3]
    assert len(saturated) > 200
    mean = saturated.mean(axis=0)
    palette = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    cosine = {name: mean @ rgb / np.linalg.norm(mean) / np.linalg.norm(rgb) for name, rgb in palette.items()}
    assert max(cosine, key=cosine.get) == colour


def test_background_is_visible(backend):
    seeds = [[image_seed(2, 0, j) for j in range(4)]]
    dark = backend.generate([make_caption("blue", "square", "rings", "dark")], seeds)
    light = backend.generate([make_caption("blue", "square", "rings", "light")], seeds)
    corners = lambda images: images[..., [0, 0, -1, -1], [0, -1, 0, -1], :].mean()  # noqa: E731
    assert corners(dark) < 80 < 150 < corners(light)


def test_resize_to_save_size():
    backend = create_backend(GeneratorConfig(height=96, width=96, save_size=32))
    assert backend.generate([CAPTION], [[1, 2]]).shape == (1, 2, 32, 32, 3)


def test_bad_requests_are_refused(backend):
    with pytest.raises(ValueError, match="does not follow the procedural grammar"):
        backend.generate([CAPTION, "an astronaut riding a horse"], [[1], [2]])
    with pytest.raises(ValueError, match="got 1 captions but 2 seed lists"):
        backend.generate([CAPTION], [[1], [2]])
    with pytest.raises(ValueError, match="same number"):
        backend.generate([CAPTION, CAPTION], [[1, 2], [3]])
    with pytest.raises(ValueError, match="not an integer in"):
        backend.generate([CAPTION], [[-1]])


def test_unknown_backend_and_custom_registration():
    with pytest.raises(ValueError, match="unknown generator backend 'nope'; choose one of: diffusers, procedural"):
        create_backend(GeneratorConfig(backend="nope"))

    @register_backend("solid-test")
    class Solid(Backend):
        facts = BackendFacts(model="solid-v1", height=16, width=16, save_size=16)

        def _generate(self, captions, seeds):
            return np.full((len(captions), len(seeds[0]), self.config.save_size, self.config.save_size, 3), 7, np.uint8)

    try:
        images = create_backend(GeneratorConfig(backend="solid-test", height=16, width=16, save_size=16)).generate(["x"], [[0]])
        assert images.shape == (1, 1, 16, 16, 3) and (images == 7).all()
    finally:
        BACKENDS.unregister("solid-test")


def test_throughput_is_in_the_expected_range(backend):
    captions = sample_captions(30, seed=0)
    seeds = [[image_seed(0, i, j) for j in range(10)] for i in range(30)]
    backend.generate(captions[:2], seeds[:2])
    start = time.perf_counter()
    images = backend.generate(captions, seeds)
    elapsed = time.perf_counter() - start
    # >= 300 images/s on one idle core; the bound here leaves room for a busy shared machine.
    assert images.shape[0] * images.shape[1] / elapsed > 60


def test_caption_file_and_cli(tmp_path, capsys):
    path = write_caption_file(tmp_path / "c.txt", 50, seed=3)
    loaded = load_captions(path)
    assert loaded.captions == sample_captions(50, seed=3)
    assert main_captions(["--n", "20", "--out", str(tmp_path / "sub" / "c.csv"), "--seed", "1"]) == 0
    assert "wrote 20 captions" in capsys.readouterr().out
    assert load_captions(tmp_path / "sub" / "c.csv").captions == sample_captions(20, seed=1)
    with pytest.raises(SystemExit) as error:
        main_captions(["--n", "5", "--out", str(tmp_path / "c.parquet")])
    assert error.value.code == 2


def test_probe_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    summary = write_probe_imagefolder(tmp_path / "probe", attribute="shape", images_per_class_train=3,
                                      images_per_class_val=2, size=32, seed=0)
    train, val = ImageFolder(tmp_path / "probe" / "train"), ImageFolder(tmp_path / "probe" / "val")
    assert sorted(train.classes) == sorted(attributes["shape"]) == sorted(summary["classes"])
    assert len(train) == 18 and len(val) == 12
    image, label = train[0]
    assert image.size == (32, 32) and train.classes[label] in attributes["shape"]
    # Disjoint from training seeds (< 2**63) and between splits; deterministic.
    from generator_service.procedural.probe_set import probe_seed

    train_seeds = {probe_seed(0, "train", c, i) for c in range(6) for i in range(3)}
    val_seeds = {probe_seed(0, "val", c, i) for c in range(6) for i in range(2)}
    assert min(train_seeds | val_seeds) >= PROBE_SEED_OFFSET and not train_seeds & val_seeds
    again = write_probe_imagefolder(tmp_path / "again", attribute="shape", images_per_class_train=3,
                                    images_per_class_val=2, size=32, seed=0)
    assert again == summary
    first = (tmp_path / "probe" / "val" / "star" / "000001.png").read_bytes()
    assert first == (tmp_path / "again" / "val" / "star" / "000001.png").read_bytes()
    with pytest.raises(ValueError, match="unknown attribute 'size'"):
        write_probe_imagefolder(tmp_path / "x", attribute="size")
