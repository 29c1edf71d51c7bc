"""Vectorized numpy renderer of procedural captions.

Coordinates: image plane ``p = (u, v)`` with the shorter side spanning [-1, 1]. Each image draws
its nuisance from ``numpy.random.Generator(PCG64(seed))`` (`Nuisance`): the shape's centre,
radius and rotation, the pattern's phase, the lighting (brightness and a linear gradient), the
background's variation (level, gradient direction, three low-frequency waves) and per-pixel noise.
Shapes are signed distance fields in the shape's own frame ``q = R(-theta) (p - centre) / radius``,
edges anti-aliased over one pixel. Patterns live in the same frame, so they turn with the shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from generator_service.procedural.grammar import COLOURS, SHAPES, parse_caption

PATTERN_FREQUENCY = 2.5      # pattern cycles per shape radius
PATTERN_DARKEN = 0.6         # pattern pixels are the colour times (1 - PATTERN_DARKEN)


@dataclass
class Nuisance:
    """Per-image random parameters, arrays of shape [N]."""

    centre_x: np.ndarray
    centre_y: np.ndarray
    radius: np.ndarray
    angle: np.ndarray
    phase_x: np.ndarray
    phase_y: np.ndarray
    brightness: np.ndarray
    light_angle: np.ndarray
    light_strength: np.ndarray
    colour_jitter: np.ndarray          # [N, 3]
    background_level: np.ndarray       # [N, 2]: start and end level (equal unless gradient)
    background_angle: np.ndarray
    wave_frequency: np.ndarray         # [N, 3, 2]
    wave_phase: np.ndarray             # [N, 3]
    wave_amplitude: np.ndarray         # [N]
    noise_sigma: np.ndarray
    generators: list[np.random.Generator]


def sample_nuisance(seeds: list[int], backgrounds: list[str]) -> Nuisance:
    """Draw every image's nuisance from its own seed (order of draws is part of the format)."""
    rows = []
    generators = []
    for seed, background in zip(seeds, backgrounds):
        rng = np.random.Generator(np.random.PCG64(seed))
        generators.append(rng)
        draws = rng.random(14)
        if background == "dark":
            levels = (0.04 + 0.14 * draws[12],) * 2
        elif background == "light":
            levels = (0.80 + 0.15 * draws[12],) * 2
        else:  # gradient: dark to light across the image
            levels = (0.05 + 0.2 * draws[12], 0.75 + 0.2 * draws[13])
        rows.append(
            dict(
                centre_x=-0.3 + 0.6 * draws[0],
                centre_y=-0.3 + 0.6 * draws[1],
                radius=0.38 + 0.22 * draws[2],
                angle=2 * np.pi * draws[3],
                phase_x=draws[4],
                phase_y=draws[5],
                brightness=0.82 + 0.3 * draws[6],
                light_angle=2 * np.pi * draws[7],
                light_strength=0.25 * draws[8],
                background_angle=2 * np.pi * draws[9],
                wave_amplitude=0.02 + 0.05 * draws[10],
                noise_sigma=0.005 + 0.025 * draws[11],
                background_level=levels,
                colour_jitter=rng.uniform(-0.05, 0.05, size=3),
                wave_frequency=rng.uniform(0.5, 2.0, size=(3, 2)) * rng.choice([-1.0, 1.0], size=(3, 2)),
                wave_phase=rng.uniform(0, 2 * np.pi, size=3),
            )
        )
    stacked = {key: np.asarray([row[key] for row in rows], dtype=np.float32) for key in rows[0]}
    return Nuisance(generators=generators, **stacked)


def _polygon_sdf(qx: np.ndarray, qy: np.ndarray, sides: int, apothem: float) -> np.ndarray:
    """Distance (inside exact, outside a close lower bound) to a regular polygon, one vertex up."""
    out = None
    for k in range(sides):
        normal = np.pi / 2 + np.pi / sides + 2 * np.pi * k / sides
        distance = qx * np.cos(normal) + qy * np.sin(normal) - apothem
        out = distance if out is None else np.maximum(out, distance)
    return out


def _box_sdf(qx: np.ndarray, qy: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    dx = np.abs(qx) - half_x
    dy = np.abs(qy) - half_y
    outside = np.sqrt(np.maximum(dx, 0) ** 2 + np.maximum(dy, 0) ** 2)
    return outside + np.minimum(np.maximum(dx, dy), 0)


def _star_sdf(qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Five-pointed star (outer radius 1.0, inner 0.42): fold into one half-point, one edge's half-plane."""
    radius = np.sqrt(qx**2 + qy**2)
    angle = np.arctan2(qx, qy)                                  # 0 at the top point
    sector = np.mod(angle, 2 * np.pi / 5) - np.pi / 5          # [-pi/5, pi/5) around a point
    x = radius * np.abs(np.sin(sector))
    y = radius * np.cos(sector)
    # Edge from the point (0, 1) to the inner vertex (r_in sin(pi/5), r_in cos(pi/5)).
    r_in = 0.42
    ex, ey = r_in * np.sin(np.pi / 5), r_in * np.cos(np.pi / 5) - 1.0
    length = np.hypot(ex, ey)
    nx, ny = -ey / length, ex / length                          # outward normal of that edge
    return x * nx + (y - 1.0) * ny


SHAPE_SDFS = {
    "circle": lambda qx, qy: np.sqrt(qx**2 + qy**2) - 0.9,
    "square": lambda qx, qy: _box_sdf(qx, qy, 0.72, 0.72),
    "triangle": lambda qx, qy: _polygon_sdf(qx, qy + 0.2, 3, 0.6),
    "hexagon": lambda qx, qy: _polygon_sdf(qx, qy, 6, 0.8),
    "star": _star_sdf,
    "cross": lambda qx, qy: np.minimum(_box_sdf(qx, qy, 0.9, 0.3), _box_sdf(qx, qy, 0.3, 0.9)),
}
assert set(SHAPE_SDFS) == set(SHAPES)


def _soft(value: np.ndarray, width: np.ndarray) -> np.ndarray:
    """0..1 step of ``value`` around 0, anti-aliased over ``width`` (same units)."""
    return np.clip(value / width + 0.5, 0.0, 1.0)


def _pattern(texture: str, qx, qy, phase_x, phase_y, pixel_q) -> np.ndarray:
    """Pattern coverage in [0, 1] (1 = darkened), in the shape's frame; ``pixel_q`` = pixel size in q units."""
    f = PATTERN_FREQUENCY
    if texture == "stripes":
        return _soft(np.sin(2 * np.pi * (f * qx + phase_x)), 2 * np.pi * f * pixel_q)
    if texture == "checks":
        a = np.sin(np.pi * (f * qx + phase_x))
        b = np.sin(np.pi * (f * qy + phase_y))
        return _soft(a * b, np.pi * f * pixel_q)
    if texture == "rings":
        return _soft(np.sin(2 * np.pi * (f * np.sqrt(qx**2 + qy**2) + phase_x)), 2 * np.pi * f * pixel_q)
    if texture == "dots":
        cell_x = np.mod(f * qx + phase_x, 1.0) - 0.5
        cell_y = np.mod(f * qy + phase_y, 1.0) - 0.5
        return _soft(0.3 - np.sqrt(cell_x**2 + cell_y**2), f * pixel_q)
    raise ValueError(f"unknown texture {texture!r}")


def render(attributes: list[dict[str, str]], seeds: list[int], height: int, width: int) -> np.ndarray:
    """Render N images; returns uint8 [N, height, width, 3]. ``attributes[k]`` as from `parse_caption`."""
    n = len(attributes)
    if n != len(seeds):
        raise ValueError(f"got {n} attribute sets but {len(seeds)} seeds")
    nu = sample_nuisance(list(seeds), [a["background"] for a in attributes])
    scale = 2.0 / min(height, width)
    u = ((np.arange(width, dtype=np.float32) + 0.5) - width / 2) * scale          # [W]
    v = ((np.arange(height, dtype=np.float32) + 0.5) - height / 2) * scale        # [H]
    U, V = u[None, None, :], v[None, :, None]                                       # [1, 1, W], [1, H, 1]

    def col(a: np.ndarray) -> np.ndarray:
        return a[:, None, None]                                                     # [N] -> [N, 1, 1]

    # Background: level (or dark-to-light gradient) plus three low-frequency waves.
    along = np.cos(col(nu.background_angle)) * U + np.sin(col(nu.background_angle)) * V      # [N, H, W]
    t = np.clip(along * 0.5 + 0.5, 0, 1)
    background = col(nu.background_level[:, 0]) * (1 - t) + col(nu.background_level[:, 1]) * t
    for k in range(3):
        wave = np.cos(np.pi * (col(nu.wave_frequency[:, k, 0]) * U + col(nu.wave_frequency[:, k, 1]) * V)
                      + col(nu.wave_phase[:, k]))
        background = background + col(nu.wave_amplitude) * wave

    # Shape frame, coverage and pattern.
    dx, dy = U - col(nu.centre_x), V - col(nu.centre_y)
    cos, sin = np.cos(col(nu.angle)), np.sin(col(nu.angle))
    qx = (cos * dx + sin * dy) / col(nu.radius)
    qy = (-sin * dx + cos * dy) / col(nu.radius)
    pixel_q = scale / col(nu.radius)                                                # [N, 1, 1]
    coverage = np.empty((n, height, width), dtype=np.float32)
    pattern = np.empty((n, height, width), dtype=np.float32)
    shapes = np.array([a["shape"] for a in attributes])
    textures = np.array([a["texture"] for a in attributes])
    for shape, sdf in SHAPE_SDFS.items():
        index = np.flatnonzero(shapes == shape)
        if index.size:
            coverage[index] = _soft(-sdf(qx[index], qy[index]), pixel_q[index])
    for texture in np.unique(textures):
        index = np.flatnonzero(textures == texture)
        pattern[index] = _pattern(texture, qx[index], qy[index], col(nu.phase_x[index]),
                                  col(nu.phase_y[index]), pixel_q[index])

    colour = np.asarray([COLOURS[a["colour"]] for a in attributes], dtype=np.float32) + nu.colour_jitter
    foreground = colour[:, None, None, :] * (1 - PATTERN_DARKEN * pattern[..., None])            # [N, H, W, 3]
    image = background[..., None] * (1 - coverage[..., None]) + foreground * coverage[..., None]

    light = col(nu.brightness) * (1 + col(nu.light_strength) * (np.cos(col(nu.light_angle)) * U
                                                                + np.sin(col(nu.light_angle)) * V))
    image *= light[..., None]
    noise = np.empty((height, width, 3), dtype=np.float32)
    for k, rng in enumerate(nu.generators):
        rng.standard_normal(out=noise, dtype=np.float32)
        image[k] += nu.noise_sigma[k] * noise
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def render_captions(captions: list[str], seeds: list[int], height: int, width: int) -> np.ndarray:
    """Parse and render; returns uint8 [N, height, width, 3]."""
    return render([parse_caption(c) for c in captions], seeds, height, width)
