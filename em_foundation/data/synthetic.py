"""Seeded synthetic electron micrographs of mitochondria, with exact masks.

Why this exists: the workflow must run end to end (tests, dry runs, a laptop without the
real archives), and the domain-gap analysis needs a gap whose cause is known. The two
domains share one scene generator (the biology: cells, mitochondria, vesicles) and differ
only in how the scene is imaged, the way Lucchi++ (FIB-SEM, isotropic 5 nm voxels: low
noise, sharp, large objects in pixels, smooth cytoplasm) and Drosophila VNC (ssTEM,
4.6 nm pixels but 45-50 nm sections: projection smear, film grain, other contrast and
gamma, smaller objects, textured cytoplasm) differ.

The mask is the object geometry before any imaging degradation, so it is exact: every
pixel of a mitochondrion, its double membrane included, is 1; everything else is 0.

The scene is built in an intensity space where 1 is bright (stain-free cytoplasm) and
stain (membranes, matrix) makes pixels darker. Everything is vectorised numpy/scipy; the
only Python loops run over objects, never over pixels.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from scipy import ndimage

from em_foundation.data.prepared import Split
from em_foundation.data.registry import CONVERTERS, declare_options


@dataclass(frozen=True)
class DomainStyle:
    """How one imaging modality renders the shared scene.

    Lengths are in pixels of the rendered image. ``object_scale`` multiplies every
    biological length (mitochondria, vesicles, cells, cristae), because the same
    organelle covers fewer pixels in one modality than in the other.
    """

    voxel_size_nm: tuple[float, float, float]  # (y, x, z) as recorded in the prepared file
    object_scale: float  # biological lengths in pixels, relative to the FIB-SEM domain
    foreground_fraction: tuple[float, float]  # per-image target range of mitochondria pixels
    cell_spacing: float  # mean distance between neighbouring cell processes, px (before scale)
    cell_membrane_width: float  # half-width of a plasma membrane, px
    cell_membrane_depth: float  # how much darker a plasma membrane is than cytoplasm
    cell_shade: float  # std of the per-cell cytoplasm grey level (neurites differ in density)
    mito_stain: float  # multiplies the mitochondrial matrix darkness (staining protocols differ)
    vesicle_density: float  # vesicles per 10,000 px (before scale)
    background: float  # cytoplasm grey level
    background_texture: float  # amplitude of the granular cytoplasm texture
    texture_sigma: float  # grain size of that texture, px
    illumination: float  # amplitude of slow shading across the field
    blur_sigma: tuple[float, float]  # (rows, cols) Gaussian blur, px; unequal = section smear
    noise_std: float  # detector / film noise after blur, in [0, 1] units
    noise_grain: float  # correlation length of the noise, px (0 = white)
    contrast: float  # gain about mid-grey applied after blur
    gamma: float  # display gamma applied after the gain


DOMAINS: dict[str, DomainStyle] = {
    # Lucchi++-like: sharp, quiet, large organelles, smooth cytoplasm.
    "fibsem": DomainStyle(
        voxel_size_nm=(5.0, 5.0, 5.0),
        object_scale=1.0,
        foreground_fraction=(0.05, 0.11),
        cell_spacing=48.0,
        cell_membrane_width=1.1,
        cell_membrane_depth=0.30,
        cell_shade=0.035,
        mito_stain=1.0,
        vesicle_density=3.5,
        background=0.66,
        background_texture=0.035,
        texture_sigma=1.2,
        illumination=0.05,
        blur_sigma=(0.7, 0.7),
        noise_std=0.03,
        noise_grain=0.0,
        contrast=1.0,
        gamma=1.0,
    ),
    # VNC-like: projection smear along one axis, film grain, harder contrast, lighter gamma,
    # small organelles in a busy, textured neuropil.
    "sstem": DomainStyle(
        voxel_size_nm=(4.6, 4.6, 50.0),
        object_scale=0.6,
        foreground_fraction=(0.04, 0.10),
        cell_spacing=60.0,
        cell_membrane_width=1.5,
        cell_membrane_depth=0.38,
        cell_shade=0.045,
        mito_stain=1.4,
        vesicle_density=3.0,
        background=0.64,
        background_texture=0.06,
        texture_sigma=1.8,
        illumination=0.06,
        blur_sigma=(1.6, 0.8),
        noise_std=0.075,
        noise_grain=0.6,
        contrast=1.3,
        gamma=0.75,
    ),
}

DEFAULT_OPTIONS: dict[str, Any] = {"n_train": 12, "n_test": 4, "height": 256, "width": 256, "seed": 0}
declare_options("synthetic", {"domain": None, **DEFAULT_OPTIONS}, required=("domain",))
_STREAMS = {"train": 0, "test": 1}


# --------------------------------------------------------------------------- helpers


def _image_rng(domain: str, seed: int, stream: int, index: int) -> np.random.Generator:
    """One independent generator per image, so image i never depends on how many are drawn.

    The domain name enters the entropy so that the two domains do not share scene layouts
    for the same seed (which would correlate them in a domain-gap analysis).
    """
    domain_key = zlib.crc32(domain.encode())
    return np.random.default_rng(np.random.SeedSequence([seed, stream, domain_key, index]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit std.

    Large scales are drawn on a coarse grid and upsampled: a 60-px Gaussian at full
    resolution would cost more than the rest of the image together.
    """
    factor = max(1, int(sigma // 3))
    coarse = (shape[0] // factor + 3, shape[1] // factor + 3)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma / factor, mode="wrap")
    if factor > 1:
        field = ndimage.zoom(field, factor, order=1)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-12)


def _profile(distance: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A soft line: 1 at ``distance == centre``, falling off over ``width`` pixels."""
    return np.exp(-(((distance - centre) / width) ** 2))


# --------------------------------------------------------------------------- scene: cells


def _cell_labels(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
    """Warped Voronoi cells: neuropil cross-sections, with curvy rather than straight walls."""
    height, width = shape
    n_seeds = max(2, int(height * width / spacing**2))
    seeds = np.ones(shape, dtype=bool)
    seeds[rng.integers(0, height, n_seeds), rng.integers(0, width, n_seeds)] = False
    ids = np.cumsum(~seeds).reshape(shape)  # unique id at each seed pixel
    _, (iy, ix) = ndimage.distance_transform_edt(seeds, return_indices=True)
    labels = ids[iy, ix]
    # Displacement smooth enough that the warp never folds (which would draw stray fans).
    warp = 0.3 * spacing
    rows, cols = np.indices(shape)
    wy = np.clip(np.rint(rows + warp * _smooth_noise(rng, shape, spacing / 2)), 0, height - 1).astype(int)
    wx = np.clip(np.rint(cols + warp * _smooth_noise(rng, shape, spacing / 2)), 0, width - 1).astype(int)
    return labels[wy, wx]


def _label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour belongs to another cell."""
    boundary = np.zeros(labels.shape, dtype=bool)
    boundary[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    boundary[:-1, :] |= labels[1:, :] != labels[:-1, :]
    return boundary


# --------------------------------------------------------------------------- scene: mitochondria


@dataclass(frozen=True)
class _Mito:
    """One mitochondrion: a bent ellipse with a wobbly outline, and its cristae pattern."""

    cy: float
    cx: float
    major: float  # semi-axis along the long axis, px
    minor: float  # semi-axis across, px
    angle: float  # radians
    bend: float  # curvature of the long axis (banana shapes)
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2, 3, ...
    cristae_period: float  # px between lamellae
    cristae_phase: float
    cristae_tilt: float  # lamellae are not exactly perpendicular to the long axis
    matrix: float  # how much darker the matrix is than cytoplasm

    def local(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Object coordinates (u along, v across, after bending) and the outline test value.

        Returns u, v and rho / r(theta): below 1 is inside.
        """
        dy, dx = rows - self.cy, cols - self.cx
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u = dx * cos + dy * sin
        v = -dx * sin + dy * cos - self.bend * u**2 / self.major
        un, vn = u / self.major, v / self.minor
        theta = np.arctan2(vn, un)
        outline = 1.0 + sum(a * np.cos(k * theta + p) for k, (a, p) in enumerate(self.harmonics, start=2))
        return u, v, np.hypot(un, vn) / outline

    def extent(self) -> float:
        """Radius that surely contains the object (harmonics add at most ~30 %)."""
        return 1.4 * self.major + 2 * abs(self.bend) * self.major + 2


def _draw_mito(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> _Mito:
    """Sizes and shapes of mitochondria cross-sections, from round (cut across) to long."""
    minor = rng.uniform(11.0, 19.0) * scale
    major = minor * rng.uniform(1.0, 3.0)
    return _Mito(
        cy=rng.uniform(0, shape[0]),
        cx=rng.uniform(0, shape[1]),
        major=major,
        minor=minor,
        angle=rng.uniform(0, np.pi),
        bend=rng.uniform(-0.25, 0.25) if major > 1.6 * minor else 0.0,
        harmonics=tuple((rng.normal(0, 0.05), rng.uniform(0, 2 * np.pi)) for _ in range(3)),
        cristae_period=rng.uniform(5.0, 8.0) * max(scale, 0.75),
        cristae_phase=rng.uniform(0, 1),
        cristae_tilt=rng.normal(0, 0.25),
        matrix=rng.uniform(0.12, 0.2),
    )


def _bbox(mito: _Mito, shape: tuple[int, int]) -> tuple[slice, slice]:
    r = mito.extent()
    return (
        slice(max(0, int(mito.cy - r)), min(shape[0], int(mito.cy + r) + 1)),
        slice(max(0, int(mito.cx - r)), min(shape[1], int(mito.cx + r) + 1)),
    )


def _place_mitochondria(
    rng: np.random.Generator, shape: tuple[int, int], style: DomainStyle
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place non-touching mitochondria until a drawn foreground fraction is reached.

    Returns the mask, a matrix-darkness map and a cristae map (1 on a lamella). Drawing a
    target fraction, instead of a count, keeps every image's foreground in the domain's
    range whatever the image size.
    """
    target = rng.uniform(*style.foreground_fraction)
    ceiling = style.foreground_fraction[1] + 0.03
    total = shape[0] * shape[1]
    mask = np.zeros(shape, dtype=bool)
    keepout = np.zeros(shape, dtype=bool)  # mask grown by a gap, so objects never touch
    matrix = np.zeros(shape, dtype=np.float32)
    cristae = np.zeros(shape, dtype=np.float32)
    gap = max(2, int(round(4 * style.object_scale)))
    for _ in range(200):
        if mask.sum() >= target * total:
            break
        mito = _draw_mito(rng, shape, style.object_scale)
        box = _bbox(mito, shape)
        rows, cols = np.mgrid[box]
        u, v, rho = mito.local(rows, cols)
        inside = rho < 1.0
        if not inside.any() or (keepout[box] & inside).any():
            continue
        if mask.sum() + inside.sum() > ceiling * total:
            continue
        mask[box] |= inside
        keepout[box] |= ndimage.binary_dilation(inside, iterations=gap)
        matrix[box][inside] = mito.matrix
        cristae[box][inside] = _lamellae(mito, u, v)[inside]
    return mask, matrix, cristae


def _lamellae(mito: _Mito, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cristae: thin sheets across the long axis, slightly wavy, as seen in cross-section."""
    wave = 0.6 * np.sin(v / max(mito.minor, 1.0) * np.pi + mito.cristae_phase * 6.0)
    s = (u + mito.cristae_tilt * v) / mito.cristae_period + mito.cristae_phase + 0.15 * wave
    distance = np.abs(s - np.round(s)) * mito.cristae_period  # px to the nearest lamella
    return _profile(distance, 0.0, 0.9).astype(np.float32)


# --------------------------------------------------------------------------- scene: small things


def _disc_field(shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance to the nearest disc's rim (negative inside), drawn disc by disc."""
    signed = np.full(shape, np.inf, dtype=np.float32)
    for (cy, cx), r in zip(centres, radii):
        reach = r + 4
        box = (
            slice(max(0, int(cy - reach)), min(shape[0], int(cy + reach) + 1)),
            slice(max(0, int(cx - reach)), min(shape[1], int(cx + reach) + 1)),
        )
        rows, cols = np.mgrid[box]
        d = np.hypot(rows - cy, cols - cx) - r
        np.minimum(signed[box], d, out=signed[box])
    return signed, np.isfinite(signed)


def _vesicle_centres(
    rng: np.random.Generator, shape: tuple[int, int], style: DomainStyle, free: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Synaptic-vesicle-like circles: a few clusters plus scattered ones, away from mitochondria."""
    scale = style.object_scale
    n = rng.poisson(style.vesicle_density * shape[0] * shape[1] / 1e4 / scale)
    n_clusters = rng.integers(1, 4)
    clustered = rng.random(n) < 0.6
    hubs = rng.uniform((0, 0), shape, size=(n_clusters, 2))
    centres = np.where(
        clustered[:, None],
        hubs[rng.integers(0, n_clusters, n)] + rng.normal(0, 14 * scale, (n, 2)),
        rng.uniform((0, 0), shape, size=(n, 2)),
    )
    radii = rng.uniform(3.0, 6.0, n) * max(scale, 0.7)
    within = np.all((centres >= 0) & (centres < np.array(shape) - 1), axis=1)
    iy = np.clip(centres[:, 0].astype(int), 0, shape[0] - 1)
    ix = np.clip(centres[:, 1].astype(int), 0, shape[1] - 1)
    keep = within & (free[iy, ix] > radii + 3)
    return centres[keep], radii[keep]


def _dense_bodies(rng: np.random.Generator, shape: tuple[int, int], style: DomainStyle, free: np.ndarray) -> np.ndarray:
    """Darkness of a few dense organelles (lysosome-like): as dark as mitochondria but
    featureless, so that a global intensity threshold cannot tell them apart."""
    scale = style.object_scale
    n = rng.poisson(1.5 * shape[0] * shape[1] / 65536 / scale)
    centres = rng.uniform((0, 0), shape, size=(n, 2))
    radii = rng.uniform(4.0, 9.0, n) * scale
    iy = np.clip(centres[:, 0].astype(int), 0, shape[0] - 1)
    ix = np.clip(centres[:, 1].astype(int), 0, shape[1] - 1)
    keep = free[iy, ix] > radii + 4
    signed, _ = _disc_field(shape, centres[keep], radii[keep])
    return (0.22 / (1.0 + np.exp(np.clip(signed, -50, 50) / 0.8))).astype(np.float32)


# --------------------------------------------------------------------------- rendering


def _scene(rng: np.random.Generator, shape: tuple[int, int], style: DomainStyle) -> tuple[np.ndarray, np.ndarray]:
    """The noise-free, sharp specimen (intensity in [0, 1], bright = unstained) and its mask."""
    scale = style.object_scale
    mask, matrix, cristae = _place_mitochondria(rng, shape, style)
    inside = ndimage.distance_transform_edt(mask).astype(np.float32)
    outside = ndimage.distance_transform_edt(~mask).astype(np.float32)

    labels = _cell_labels(rng, shape, style.cell_spacing * scale)
    shade = rng.normal(0.0, style.cell_shade, labels.max() + 1).astype(np.float32)[labels]
    walls = ndimage.distance_transform_edt(~_label_boundaries(labels)).astype(np.float32)
    # Plasma membranes wrap around mitochondria rather than cutting through them.
    wall_darkness = _profile(walls, 0.0, style.cell_membrane_width) * np.clip((outside - 3) / 4, 0, 1)

    texture = _smooth_noise(rng, shape, style.texture_sigma)
    image = style.background + shade + style.background_texture * texture
    image = image + style.illumination * _smooth_noise(rng, shape, 60.0)
    image -= style.cell_membrane_depth * wall_darkness

    # Mitochondria: darker granular matrix, pale lamellae broken into pieces, double membrane.
    broken = np.clip(_smooth_noise(rng, shape, 2.5 * scale) + 0.9, 0, 1)
    core = np.clip((inside - 2.5 * max(scale, 0.7)) / 1.5, 0, 1)
    image -= style.mito_stain * matrix * (1 + 0.5 * texture * mask)
    image += 0.2 * cristae * broken * core
    gap = 2.2 * max(scale, 0.7)
    ring = np.maximum(_profile(inside, 0.9, 0.8), _profile(inside, 0.9 + gap, 0.8)) * mask
    image -= 0.28 * ring

    free = outside.copy()
    np.minimum(free, walls + 2, out=free)  # vesicles sit inside cells, not on membranes
    centres, radii = _vesicle_centres(rng, shape, style, free)
    if len(radii):
        signed, _ = _disc_field(shape, centres, radii)
        image -= 0.3 * _profile(signed, 0.0, 0.9 * max(scale, 0.8))
        image += 0.05 * (signed < -1)
    image -= _dense_bodies(rng, shape, style, outside)
    return image.astype(np.float32), mask.astype(np.uint8)


def _imaging(rng: np.random.Generator, scene: np.ndarray, style: DomainStyle) -> np.ndarray:
    """Blur (optics, section projection), gain and gamma, then noise; to uint8."""
    image = ndimage.gaussian_filter(scene, style.blur_sigma)
    gain = style.contrast * rng.uniform(0.92, 1.08)  # slice-to-slice exposure drift
    image = np.clip(0.5 + gain * (image - 0.5), 0, 1) ** style.gamma
    noise = rng.standard_normal(scene.shape).astype(np.float32)
    if style.noise_grain > 0:
        noise = ndimage.gaussian_filter(noise, style.noise_grain)
        noise /= noise.std() + 1e-12
    image = image + style.noise_std * noise
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def generate_image(
    domain: str, height: int, width: int, seed: int, index: int, stream: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the (domain, seed, stream) sequence and its mask, both (H, W) uint8."""
    style = _style(domain)
    rng = _image_rng(domain, seed, stream, index)
    scene, mask = _scene(rng, (height, width), style)
    return _imaging(rng, scene, style), mask


def generate_images(
    domain: str, n: int, height: int, width: int, seed: int, *, stream: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images and exact mitochondria masks, (n, H, W) uint8 each, masks in {0, 1}.

    Image i depends only on (domain, seed, stream, i), never on n, so a larger draw
    extends a smaller one. ``stream`` separates sequences of the same seed (train/test).
    """
    if n < 0 or height < 16 or width < 16:
        raise ValueError(f"need n >= 0 and images of at least 16x16, got n={n}, {height}x{width}")
    images = np.empty((n, height, width), dtype=np.uint8)
    masks = np.empty((n, height, width), dtype=np.uint8)
    for i in range(n):
        images[i], masks[i] = generate_image(domain, height, width, seed, i, stream)
    return images, masks


def _style(domain: str) -> DomainStyle:
    try:
        return DOMAINS[domain]
    except KeyError:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose from {', '.join(DOMAINS)}") from None


# --------------------------------------------------------------------------- converter


@CONVERTERS.register("synthetic")
def convert_synthetic(archive: Optional[Path], spec: dict[str, Any]) -> tuple[dict[str, Split], dict[str, Any]]:
    """Generate train and test splits for a ``converter: synthetic`` dataset entry.

    Train and test come from different streams of the same seed, so they never share an
    image, and changing n_train does not change the test set.
    """
    if archive is not None:
        raise ValueError(f"synthetic dataset {spec!r} is generated and takes no archive, got {archive}")
    options = {**DEFAULT_OPTIONS, **(spec.get("options") or {})}
    unknown = set(options) - set(DEFAULT_OPTIONS) - {"domain"}
    if unknown:
        raise ValueError(f"synthetic dataset {spec!r}: unknown options {sorted(unknown)}")
    if "domain" not in options:
        raise ValueError(f"synthetic dataset {spec!r} needs options.domain, one of {', '.join(DOMAINS)}")
    domain = options["domain"]
    style = _style(domain)
    splits = {}
    for split_name, stream in _STREAMS.items():
        n = int(options[f"n_{split_name}"])
        raw, labels = generate_images(
            domain, n, int(options["height"]), int(options["width"]), int(options["seed"]), stream=stream
        )
        names = [str(i) for i in range(n)]
        sources = [f"synthetic:{domain}:{split_name}:{i}" for i in range(n)]
        splits[split_name] = Split(raw=raw, labels=labels, names=names, sources=sources)
    attrs = {
        "voxel_size_nm": list(style.voxel_size_nm),
        "licence": "CC0 (generated)",
        "citation": "synthetic, em_foundation.data.synthetic",
        "domain": domain,
        "style": _jsonable(asdict(style)),
        "generator_options": dict(options),
    }
    return splits, attrs


def _jsonable(style: dict[str, Any]) -> dict[str, Any]:
    """Tuples to lists, so that the attrs round-trip through JSON unchanged."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in style.items()}
