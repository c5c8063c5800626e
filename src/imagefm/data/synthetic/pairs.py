"""Minimal-pair scene groups: hard negatives for contrastive training.

Scenes come in groups of ``group_size`` single-object scenes that differ in exactly one
attribute, shape or colour, and share everything else (background, size, texture, position,
drawing detail). In a contrastive batch made of whole groups, the only way to tell a group's
captions apart is the attribute that varies, so a small model cannot lean on the easy cues
(colour, background) alone and learns shape in a fraction of the steps. A ``mixed`` fraction of
groups are ordinary random scenes of every layout, so counting and relations are still seen.

Sample ``index`` is member ``index % group_size`` of group ``index // group_size``; a loader that
wants the hard negatives must batch whole groups (consecutive indices).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from imagefm.data.synthetic.scenes import SceneConfig, SceneSpec, sample_scene

VARIED = ("shape", "colour")


def group_specs(group_rng: np.random.Generator, config: SceneConfig, group_size: int
                ) -> list[SceneSpec]:
    """``group_size`` single-object scenes identical but for the shape or the colour."""
    base = sample_scene(group_rng, dataclasses.replace(config, layouts=("single",)))
    obj = base.objects[0]
    vary = VARIED[int(group_rng.integers(len(VARIED)))]
    combos = config.allowed_combos()
    if vary == "shape":
        options = [s for c, s in combos if c == obj.colour and s != obj.shape]
    else:  # a colour equal to the background would make the object invisible
        options = [c for c, s in combos
                   if s == obj.shape and c not in (obj.colour, base.background.colour)]
    others = [options[i] for i in group_rng.permutation(len(options))]
    values = [getattr(obj, vary)] + others
    # With fewer options than members, values repeat: duplicates are harmless positives.
    chosen = [values[m % len(values)] for m in range(group_size)]
    return [dataclasses.replace(base, objects=(dataclasses.replace(obj, **{vary: v}),))
            for v in chosen]


def member_spec(group_rng: np.random.Generator, member_rng: np.random.Generator, member: int,
                config: SceneConfig, group_size: int, mixed: float) -> SceneSpec:
    """The scene of one member of a group (see the module docstring)."""
    if group_rng.random() < mixed:
        return sample_scene(member_rng, config)
    return group_specs(group_rng, config, group_size)[member]
