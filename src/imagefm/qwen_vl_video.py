"""Qwen2-VL / Qwen2.5-VL video input: frames → ``pixel_values_videos``, ``video_grid_thw`` (and
Qwen2.5-VL's ``second_per_grid_ts``) exactly as transformers' ``Qwen2VLVideoProcessor`` and
``Qwen2_5_VLProcessor`` make them.

A video is a list of frames (PIL images, paths, bytes or ``uint8`` arrays) or one ``uint8``
array [T, H, W, C]; all frames of a video have one size. The frames are used as given (sample
them first; the reference's ``do_sample_frames`` is off by default too).

1. ``smart_resize`` (the image rule) with the video's own ``min_pixels`` / ``max_pixels``,
   optionally capped so the whole video stays within ``max_video_tokens``;
2. every frame resized with torch's antialiased bicubic on ``uint8`` (what torchvision runs on
   the CPU for the reference, so the values are its own), then ``(x - 255 mean) / (255 std)``
   in float32 (the reference's fused rescale and normalise);
3. an odd frame count is made even by repeating the last frame, each pair of frames is one
   temporal patch (the vision tower's Conv3d kernel spans ``temporal_patch_size`` = 2 frames):
   rows of C*T*P*P values in the tower's 2x2-block order, grid (frames / 2, height / 14,
   width / 14).

The text side (:class:`imagefm.qwen_vl_processor.QwenVLProcessor`) expands each
``<|video_pad|>`` into ``t*h*w / 4`` pad tokens. Qwen2.5-VL also places the frames on an
absolute time axis: ``second_per_grid_ts = temporal_patch_size / fps`` per video (``fps`` given
per video, else ``config.video.fps``), which the model turns into M-RoPE temporal positions
(:mod:`imagefm.models.qwen_vl_rope`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagefm.data.image import _array_to_pil, _rgb_array, open_image
from imagefm.models.qwen_vl import QwenVLConfig

MAX_ASPECT_RATIO = 200  # the reference refuses more elongated images
# torch modes for our interpolation names, as torchvision maps PIL's (nearest: "nearest-exact").
_MODES = {"bicubic": ("bicubic", True), "bilinear": ("bilinear", True),
          "nearest": ("nearest-exact", False)}


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) both multiples of ``factor``, pixel count within [min, max], aspect ratio
    kept as closely as rounding allows. Python's ``round`` (half to even), as the reference.
    Images and video frames alike."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {width}x{height}: the aspect ratio must be below "
                         f"{MAX_ASPECT_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _frame_rgb(frame: Any) -> np.ndarray:
    """One frame as ``uint8`` RGB [H, W, 3]."""
    if isinstance(frame, torch.Tensor):
        frame = frame.numpy()
    if isinstance(frame, np.ndarray):
        rgb = _rgb_array(frame)
        return rgb if rgb is not None else np.asarray(open_image(_array_to_pil(frame)))
    return np.asarray(open_image(frame))


def video_frames(video: Any) -> np.ndarray:
    """A video (frames or a [T, H, W, C] array) as one ``uint8`` RGB array [T, H, W, 3]."""
    if isinstance(video, torch.Tensor):
        video = video.numpy()
    if isinstance(video, np.ndarray) and video.ndim == 4:
        frames = [_frame_rgb(frame) for frame in video]
    elif isinstance(video, (list, tuple)) and video:
        frames = [_frame_rgb(frame) for frame in video]
    else:
        raise ValueError("a video is a non-empty list of frames (PIL images, paths or uint8 "
                         "arrays) or a uint8 array [frames, height, width, channels]")
    sizes = {frame.shape for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames of a video must have one size, got {sorted(sizes)}")
    return np.stack(frames)


class QwenVLVideoProcessor:
    """Videos → (``pixel_values_videos`` [sum(t*h*w), C*T*P*P] float32, ``video_grid_thw``
    [videos, 3]) and, with ``fps``, ``second_per_grid_ts`` [videos]."""

    def __init__(self, config: QwenVLConfig) -> None:
        vision, video = config.vision, config.video
        self.patch, self.merge = vision.patch_size, vision.merge_size
        self.temporal, self.channels = vision.temporal_patch_size, vision.in_channels
        self.video = video
        self.mode, self.antialias = _MODES[video.interpolation]
        # The reference fuses /255 into the normalisation: (x - mean*255) / (std*255), float32.
        mean = torch.tensor(video.mean, dtype=torch.float32) * (1.0 / (1 / 255))
        std = torch.tensor(video.std, dtype=torch.float32) * (1.0 / (1 / 255))
        levels = torch.arange(256, dtype=torch.float32)
        self._table = (levels[None, :] - mean[:, None]) / std[:, None]  # [C, 256]

    def target_size(self, height: int, width: int, frames: int) -> tuple[int, int]:
        factor = self.patch * self.merge
        max_pixels = self.video.max_pixels
        if self.video.max_video_tokens:  # an even share of the whole video's pixel budget
            total = int(self.video.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * self.temporal // frames),
                             int(self.video.min_pixels * 1.05))
        return smart_resize(height, width, factor, self.video.min_pixels, max_pixels)

    def pixels(self, video: Any) -> torch.Tensor:
        """The resized ``uint8`` frames [T, C, H, W] of one video."""
        frames = torch.from_numpy(video_frames(video)).permute(0, 3, 1, 2).contiguous()
        count, _, height, width = frames.shape
        size = self.target_size(height, width, count)
        if size != (height, width):
            frames = F.interpolate(frames, size=size, mode=self.mode, antialias=self.antialias,
                                   **({} if self.mode == "nearest-exact"
                                      else {"align_corners": False}))
        return frames

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Normalised patch rows of one video [T, C, H, W] (uint8), in the tower's order, and
        its (t, h, w) grid."""
        if pad := -len(frames) % self.temporal:  # repeat the last frame
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        count, c, height, width = frames.shape
        normed = torch.stack([self._table[ch][frames[:, ch].long()] for ch in range(c)], dim=1)
        p, m, tp = self.patch, self.merge, self.temporal
        gt, gh, gw = count // tp, height // p, width // p
        blocks = normed.view(gt, tp, c, gh // m, m, p, gw // m, m, p)
        blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, T, P, P]
        return blocks.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)

    def __call__(self, videos: Sequence[Any],
                 fps: float | Sequence[float | None] | None = None) -> dict[str, torch.Tensor]:
        """``fps``: one frame rate for all videos or one per video (None: ``video.fps``);
        gives ``second_per_grid_ts`` = temporal_patch_size / fps."""
        rows, grids = [], []
        for video in videos:
            patches, grid = self.patchify(self.pixels(video))
            rows.append(patches)
            grids.append(grid)
        rates = list(fps) if isinstance(fps, (list, tuple)) else [fps] * len(grids)
        if len(rates) != len(grids):
            raise ValueError(f"{len(rates)} frame rates were given for {len(grids)} videos")
        rates = [self.video.fps if rate is None else float(rate) for rate in rates]
        if any(rate <= 0 for rate in rates):
            raise ValueError(f"frame rates must be > 0, got {rates}")
        return {"pixel_values_videos": torch.cat(rows),
                "video_grid_thw": torch.tensor(grids, dtype=torch.long),
                "second_per_grid_ts": torch.tensor([self.temporal / rate for rate in rates],
                                                   dtype=torch.float32)}
