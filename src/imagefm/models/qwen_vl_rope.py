"""M-RoPE positions of a Qwen2-VL / Qwen2.5-VL prompt holding images and videos.

Every token gets three positions (temporal, row, column):

- text: the same number in all three rows, one more than the token before it;
- an image (grid t=1, h, w patches) or a video (t temporal patches of two frames each): its
  ``t * h/m * w/m`` tokens (m = merge size) get ``start + (time(i), row, column)``, where
  ``start`` is where the span begins;
- the text after a span continues at the span's largest position + 1.

``time(i)`` is the temporal patch index ``i`` for images and for Qwen2-VL's videos. Qwen2.5-VL
places video frames on an absolute time axis instead: ``time(i) = int(i * tokens_per_second *
second_per_grid_t)`` where ``second_per_grid_t = temporal_patch_size / fps`` is the time one
temporal patch spans (the processor's ``second_per_grid_ts``), so two videos of the same length
in seconds reach the same temporal position whatever their frame rate. The product is taken in
float32 and truncated, as the reference does.

The rule "continue after the largest position" is that of Qwen's own code, vLLM and
transformers 4.x (and 5.2). Later transformers 5 releases (5.25 checked) continue after
``start + max(h, w) / m`` instead, ignoring the video's temporal extent, while their rope deltas
still use the largest position: for a video whose time axis reaches further than its rows and
columns, the text after it then overlaps the video's temporal positions and the first generated
token jumps. Both rules agree for images and for videos with ``time(t - 1) < max(h, w) / m``,
where tests/test_qwen_vl_video.py checks positions, logits and generation against the
reference; beyond that it checks the rule above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from imagefm.models.qwen2_vl_vision import check_grid


def _intervals(videos: int, second_per_grid_ts: torch.Tensor | Sequence[float] | None,
               tokens_per_second: float | None) -> list[torch.Tensor | float]:
    """The temporal step of each video: 1 (a patch index), or tokens_per_second x seconds per
    temporal patch as a float32 scalar (the reference's arithmetic; missing seconds count 1)."""
    if tokens_per_second is None:
        return [1.0] * videos
    if second_per_grid_ts is None:
        seconds = torch.ones(videos, dtype=torch.float32)
    else:
        seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).flatten().cpu()
        if len(seconds) != videos:
            raise ValueError(f"second_per_grid_ts has {len(seconds)} values for {videos} videos "
                             f"(video_grid_thw rows)")
    return [tokens_per_second * s for s in seconds]


def vision_positions(start: int, grid: tuple[int, int, int], merge_size: int,
                     interval: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Positions [3, t*h*w/m²] of one image or video whose first token is at ``start``."""
    t, h, w = grid
    times = (torch.arange(t) * interval).long()
    grid_ids = torch.meshgrid(times, torch.arange(h // merge_size),
                              torch.arange(w // merge_size), indexing="ij")
    return torch.stack(grid_ids).reshape(3, -1) + start


def mrope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None,
                second_per_grid_ts: torch.Tensor | Sequence[float] | None = None, *,
                image_token_id: int, video_token_id: int | None, merge_size: int,
                tokens_per_second: float | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, B, L] and rope deltas [B] (see the module docstring).

    Images and videos are taken in order from their grids as their pad tokens are met, row
    after row; each needs exactly its ``t*h*w / merge²`` consecutive pad tokens. Padding
    (``attention_mask`` 0) is skipped and gets position 0. ``tokens_per_second`` None means
    Qwen2-VL (the temporal index counts temporal patches).
    """
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    grids = {image_token_id: check_grid(image_grid_thw, merge_size)
             if image_grid_thw is not None else []}
    if video_token_id is not None:
        grids[video_token_id] = (check_grid(video_grid_thw, merge_size)
                                 if video_grid_thw is not None else [])
    elif video_grid_thw is not None:
        raise ValueError("video_grid_thw was given but the model has no video token")
    intervals = {image_token_id: [1.0] * len(grids[image_token_id])}
    if video_token_id is not None:
        intervals[video_token_id] = _intervals(len(grids[video_token_id]), second_per_grid_ts,
                                               tokens_per_second)
    used = dict.fromkeys(grids, 0)
    kind = {image_token_id: "image", video_token_id: "video"}
    for row in range(batch):
        keep = (attention_mask[row].bool().cpu() if attention_mask is not None
                else torch.ones(length, dtype=torch.bool))
        ids = input_ids[row].cpu()[keep].tolist()
        pieces, start, i = [], 0, 0
        while i < len(ids):
            token = ids[i]
            if token in grids:
                index = used[token]
                if index == len(grids[token]):
                    raise ValueError(f"input_ids hold more {kind[token]}s than the "
                                     f"{len(grids[token])} rows of {kind[token]}_grid_thw")
                grid = grids[token][index]
                count = grid[0] * grid[1] * grid[2] // merge_size**2
                if ids[i:i + count] != [token] * count:
                    raise ValueError(f"{kind[token]} {index} (grid {grid}) needs {count} "
                                     f"consecutive {kind[token]} tokens in row {row}; build the "
                                     f"inputs with the model's processor")
                span = vision_positions(start, grid, merge_size, intervals[token][index])
                pieces.append(span)
                start = int(span.max()) + 1
                used[token] += 1
                i += count
            else:
                j = i
                while j < len(ids) and ids[j] not in grids:
                    j += 1
                pieces.append(torch.arange(start, start + j - i).expand(3, -1))
                start += j - i
                i = j
        if pieces:
            flat = torch.cat(pieces, dim=1)
            positions[:, row, keep] = flat
            deltas[row] = int(flat.max()) + 1 - len(ids)
    for token, grid_list in grids.items():
        if used[token] != len(grid_list):
            raise ValueError(f"{kind[token]}_grid_thw has {len(grid_list)} rows but input_ids "
                             f"hold {used[token]} {kind[token]}s")
    return positions.to(input_ids.device), deltas.to(input_ids.device)
