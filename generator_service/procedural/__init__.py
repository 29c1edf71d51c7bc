"""The procedural generator: a small caption grammar and a fast CPU renderer (no weights).

- `grammar`: `attributes`, `parse_caption`, `sample_captions`, `write_caption_file`
- `render`: `render(attributes, seeds, height, width)` -> uint8 [N, H, W, 3]
- `probe`: `write_probe_imagefolder` (ImageFolder train/val trees for a linear probe)
- `cli`: `main_captions(argv)` (``stablerep-generator captions --n N --out FILE``)
"""

from generator_service.procedural.grammar import (
    ATTRIBUTES,
    all_captions,
    attributes,
    make_caption,
    parse_caption,
    sample_captions,
    write_caption_file,
)

__all__ = [
    "ATTRIBUTES",
    "all_captions",
    "attributes",
    "make_caption",
    "parse_caption",
    "sample_captions",
    "write_caption_file",
]
