"""Tiles of large images: the tile grid of an image and the stitching of tile anomaly maps.

With ``PatchFeatureTransformer(tile_size=...)`` an image is not resized to
the backbone's input as a whole: it is (optionally rescaled by
``tile_scale``, then) cut into ``tile_size x tile_size`` tiles that overlap
by a fraction ``tile_overlap``, and every tile is one backbone input, exactly
as an untiled image of that size would be. This module holds the geometry
(:func:`tile_layout`) and the way tile patch scores become one anomaly map at
the image's own resolution (:class:`MapStitcher`); it knows nothing about
backbones or memory banks.

The grid of an image of ``L`` pixels along an axis starts tiles every
``stride = max(1, round(tile_size * (1 - tile_overlap)))`` pixels and adds
a last tile flush with the far edge when the strides do not end there, so
every pixel is covered and no tile reaches past the image. An image smaller
than a tile along an axis is padded (edge pixels repeated) up to the tile
along that axis, and is one tile along it; its map is cropped back to the
image.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ._maps import resize_map

if TYPE_CHECKING:
    from .coreset import ChunkCoreset

__all__ = ["MapStitcher", "TileLayout", "check_tile_params", "tile_layout", "tile_starts"]

#: Tiles whose patch scores are upsampled together when stitching a map.
STITCH_BATCH = 8


def check_tile_params(tile_size, tile_overlap, tile_scale) -> None:
    """Refuse tiling parameters that cannot form a tile grid, naming the problem.

    Raises
    ------
    ValueError
        If `tile_size` is neither None nor a positive integer, `tile_overlap`
        is not a number in ``[0, 1)``, or `tile_scale` is not a positive
        finite number.
    """
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, numbers.Integral)
                                  or tile_size < 1):
        raise ValueError(f"tile_size must be None (whole images) or a positive integer (pixels), got {tile_size!r}.")
    if (isinstance(tile_overlap, bool) or not isinstance(tile_overlap, numbers.Real)
            or not 0.0 <= float(tile_overlap) < 1.0):
        raise ValueError(f"tile_overlap must be a fraction in [0, 1), got {tile_overlap!r}.")
    if (isinstance(tile_scale, bool) or not isinstance(tile_scale, numbers.Real)
            or not np.isfinite(tile_scale) or tile_scale <= 0):
        raise ValueError(f"tile_scale must be a positive number (1.0: native resolution), got {tile_scale!r}.")


def tile_starts(length: int, tile_size: int, tile_overlap: float) -> np.ndarray:
    """Start of every tile along one axis of ``length`` pixels (see the module docstring).

    Examples
    --------
    >>> from skpatchcore.tiling import tile_starts
    >>> tile_starts(640, 320, 0.0).tolist(), tile_starts(640, 256, 0.25).tolist()
    ([0, 320], [0, 192, 384])
    """
    if length <= tile_size:
        return np.zeros(1, dtype=np.int64)
    stride = max(1, int(round(tile_size * (1.0 - float(tile_overlap)))))
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return np.asarray(starts, dtype=np.int64)


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one image lie.

    Attributes
    ----------
    image_size : tuple of int
        ``(height, width)`` of the image as given (upright, for files).
    scaled_size : tuple of int
        ``(height, width)`` after ``tile_scale``: the pixels that are tiled.
    tile_size : int
    origins : ndarray of shape (n_tiles, 2)
        ``(top, left)`` of every tile in the scaled image, row by row.
    """

    image_size: tuple[int, int]
    scaled_size: tuple[int, int]
    tile_size: int
    origins: np.ndarray

    @property
    def n_tiles(self) -> int:
        return int(len(self.origins))

    @property
    def padded_size(self) -> tuple[int, int]:
        """The scaled size grown to at least one tile along each axis (padding)."""
        return max(self.scaled_size[0], self.tile_size), max(self.scaled_size[1], self.tile_size)


def tile_layout(image_size: tuple[int, int], tile_size: int, tile_overlap: float = 0.0,
                tile_scale: float = 1.0) -> TileLayout:
    """The tile grid of an image of ``image_size = (height, width)`` pixels.

    Parameters
    ----------
    image_size : tuple of int
    tile_size : int
        Tile side in pixels of the scaled image.
    tile_overlap : float, default=0.0
        Fraction of a tile shared with its neighbour, in ``[0, 1)``.
    tile_scale : float, default=1.0
        The image is resized by this factor before it is cut (1.0: native
        resolution).

    Returns
    -------
    layout : TileLayout

    Examples
    --------
    >>> from skpatchcore.tiling import tile_layout
    >>> tile_layout((640, 640), 320).origins.tolist()
    [[0, 0], [0, 320], [320, 0], [320, 320]]
    """
    check_tile_params(tile_size, tile_overlap, tile_scale)
    height, width = (int(side) for side in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"Cannot tile an empty image of size {image_size}.")
    scaled = (max(1, int(round(height * tile_scale))), max(1, int(round(width * tile_scale))))
    rows = tile_starts(scaled[0], tile_size, tile_overlap)
    columns = tile_starts(scaled[1], tile_size, tile_overlap)
    origins = np.stack(np.meshgrid(rows, columns, indexing="ij"), axis=-1).reshape(-1, 2)
    return TileLayout((height, width), scaled, int(tile_size), origins)


def blend_weights(tile_size: int) -> np.ndarray:
    """Per-pixel weight of a tile's map where tiles overlap: a separable tent, highest at the centre.

    Pixels near a tile's border (where its backbone saw the least context)
    count least, and the weights of two overlapping tiles cross linearly,
    so the stitched map has no step at the tiles' borders. Every weight is
    positive, so pixels covered by one tile only keep that tile's values.
    """
    centres = np.arange(tile_size, dtype=np.float64) + 0.5
    ramp = np.minimum(centres, tile_size - centres) / (tile_size / 2.0)
    return np.outer(ramp, ramp).astype(np.float32)


class MapStitcher:
    """Builds one image's anomaly map from the patch-score grids of its tiles.

    Each tile's grid is upsampled (bilinear, as an untiled map) to the tile's
    pixels and added with :func:`blend_weights` into a canvas of the padded
    scaled image; :meth:`result` divides by the summed weights, crops the
    padding, applies the Gaussian smoothing of the whole map (so that it
    runs across tile borders) and resizes to the image's own size when
    ``tile_scale != 1``. Grids can be added in any number of calls, so the
    tiles of a large image are scored a chunk at a time.

    Parameters
    ----------
    layout : TileLayout
    sigma : float
        Gaussian smoothing, in pixels of the scaled image (the detector's
        ``map_sigma``); 0 for none.
    """

    def __init__(self, layout: TileLayout, sigma: float):
        self.layout = layout
        self.sigma = float(sigma)
        height, width = layout.padded_size
        size = layout.tile_size
        self._sum = np.zeros((height, width), dtype=np.float32)
        ramp = np.sqrt(np.diag(blend_weights(size)))  # the separable tent's 1-D factor
        self._ramp = ramp.astype(np.float32)
        # The grid is rows x columns of tiles and the tent is separable, so the
        # summed weights are an outer product: two vectors, not a second canvas.
        self._row_weight = np.zeros(height, dtype=np.float64)
        self._column_weight = np.zeros(width, dtype=np.float64)
        for top in np.unique(layout.origins[:, 0]):
            self._row_weight[top:top + size] += ramp
        for left in np.unique(layout.origins[:, 1]):
            self._column_weight[left:left + size] += ramp

    def add(self, grids: np.ndarray, origins: np.ndarray) -> None:
        """Add the patch-score grids ``(n, h, w)`` of the tiles at ``origins`` ``(n, 2)``."""
        size = self.layout.tile_size
        weight = np.outer(self._ramp, self._ramp)
        grids, origins = np.ascontiguousarray(grids, dtype=np.float32), np.asarray(origins)
        for start in range(0, len(grids), STITCH_BATCH):  # a few upsampled tiles at a time
            with torch.inference_mode():
                upsampled = F.interpolate(torch.from_numpy(grids[start:start + STITCH_BATCH])[:, None],
                                          size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
            for tile_map, (top, left) in zip(upsampled, origins[start:start + STITCH_BATCH]):
                tile_map *= weight
                self._sum[top:top + size, left:left + size] += tile_map

    def result(self) -> np.ndarray:
        """The stitched map at the image's own size ``(height, width)``, float32 (in place of the canvas)."""
        height, width = self.layout.scaled_size
        stitched = self._sum[:height, :width]
        stitched /= self._row_weight[:height, None].astype(np.float32)
        stitched /= self._column_weight[None, :width].astype(np.float32)
        self._sum = None
        if self.sigma > 0:
            gaussian_filter(stitched, sigma=self.sigma, output=stitched)  # line by line: in place is safe
        if self.layout.scaled_size != self.layout.image_size:
            stitched = resize_map(stitched, self.layout.image_size)
        return np.ascontiguousarray(stitched, dtype=np.float32)

def number_by_image(part: ChunkCoreset, tile_image: np.ndarray, first_tile: int, first_image: int) -> ChunkCoreset:
    """A chunk coreset of tiles whose ``image_index`` names the tiles' images instead.

    Parameters
    ----------
    part : ChunkCoreset
        From :meth:`CoresetSampler.chunk_coreset` of tile features whose
        first tile has global number `first_tile`.
    tile_image : ndarray of shape (n_tiles,)
        Image of each of the chunk's tiles, counted from `first_image`.
    first_tile, first_image : int

    Returns
    -------
    part : ChunkCoreset
    """
    local = np.asarray(tile_image)[np.asarray(part.image_index) - int(first_tile)]
    return part._replace(image_index=local + int(first_image))
