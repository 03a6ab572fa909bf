"""Edits of shapes-world scenes with exact targets, and short videos built from small edits.

An edit names one object ('the circle', 'the red circle') and changes it: recolour ("make the
circle green"), remove ("remove the square"), move ("move the triangle to the right", by a
quarter of the image side) or reshape ("turn the square into a circle", same box). The target
scene is the source scene with exactly that change; objects stay uniquely nameable and keep
their gaps, so a judge reading the target image finds exactly the target description.

A video is a scene whose frames differ by one moving object (a few pixels per frame) and, at
most once, one object changing colour; each frame has a caption of what changed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unijax.data.worlds import scene as scene_lib

EDIT_TYPES: tuple[str, ...] = ("recolour", "remove", "move", "reshape")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_MOVE_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}


@dataclasses.dataclass(frozen=True)
class Edit:
    """One edit: its type, the index of the edited object in `source`, the new value (colour,
    shape or direction; None for remove), the instruction, a narration and both scenes."""

    type: str
    index: int
    value: str | None
    instruction: str
    narration: str
    source: scene_lib.Scene
    target: scene_lib.Scene

    def to_dict(self) -> dict:
        """JSON-ready form (scenes as dicts)."""
        return {"edit_type": self.type, "object": self.index, "value": self.value,
                "instruction": self.instruction, "source_scene": self.source.to_dict(),
                "target_scene": self.target.to_dict()}


def move_distance(image_size: int) -> int:
    """Pixels an object moves under a 'move' edit."""
    return image_size // 4


def _replaced(scene: scene_lib.Scene, index: int, obj: scene_lib.ShapeObject | None):
    objs = list(scene.objects)
    if obj is None:
        del objs[index]
    else:
        objs[index] = obj
    return scene.with_objects(objs)


def _options(scene: scene_lib.Scene, index: int, edit_type: str) -> list[str | None]:
    """The values an edit of object `index` may take so the target stays a valid scene."""
    obj, objs = scene.objects[index], scene.objects
    if edit_type == "recolour":
        taken = {o.colour for o in objs if o.shape == obj.shape}
        return [c for c in scene_lib.COLOURS if c not in taken]
    if edit_type == "reshape":
        taken = {o.shape for o in objs if o.colour == obj.colour}
        return [s for s in scene_lib.SHAPES if s not in taken]
    if edit_type == "remove":
        return [None] if len(objs) > 1 else []
    if edit_type == "move":
        step = move_distance(scene.image_size)
        return [d for d, (dx, dy) in DIRECTIONS.items()
                if scene_lib.fits(scene, obj.replace(x=obj.x + dx * step, y=obj.y + dy * step),
                                  ignore=index)]
    raise ValueError(f"edit type must be one of {EDIT_TYPES}, got {edit_type!r}")


def apply_edit(scene: scene_lib.Scene, index: int, edit_type: str, value: str | None) -> Edit:
    """The Edit of object `index` by (edit_type, value); raises ValueError if not allowed."""
    if value not in _options(scene, index, edit_type):
        raise ValueError(f"cannot {edit_type} object {index} to {value!r} in {scene}")
    ref = scene_lib.refer(scene, index)
    if ref is None:
        raise ValueError(f"object {index} of {scene} has no unique name")
    obj = scene.objects[index]
    if edit_type == "recolour":
        new = obj.replace(colour=value)
        instruction, narration = f"make {ref} {value}", f"{ref} turns {value}"
    elif edit_type == "reshape":
        new = obj.replace(shape=value)
        instruction = f"turn {ref} into a {value}"
        narration = f"{ref} becomes a {value}"
    elif edit_type == "remove":
        new, instruction, narration = None, f"remove {ref}", f"{ref} is removed"
    else:
        dx, dy = DIRECTIONS[value]
        step = move_distance(scene.image_size)
        new = obj.replace(x=obj.x + dx * step, y=obj.y + dy * step)
        instruction = f"move {ref} {_MOVE_PHRASES[value]}"
        narration = f"{ref} moves {_MOVE_PHRASES[value]}"
    return Edit(edit_type, index, value, instruction, narration, scene,
                _replaced(scene, index, new))


def sample_edit(rng: np.random.Generator, scene: scene_lib.Scene,
                edit_type: str | None = None) -> Edit | None:
    """A random allowed edit of `scene` (of `edit_type` if given), or None if none exists."""
    types = [edit_type] if edit_type is not None else list(EDIT_TYPES)
    choices = [(t, i, v) for t in types for i in range(len(scene.objects))
               if scene_lib.refer(scene, i) is not None for v in _options(scene, i, t)]
    if not choices:
        return None
    # Uniform over types first, so rarely possible edits (moves in a crowded scene) still occur.
    kinds = sorted({c[0] for c in choices}, key=types.index)
    kind = kinds[int(rng.integers(len(kinds)))]
    choices = [c for c in choices if c[0] == kind]
    t, i, v = choices[int(rng.integers(len(choices)))]
    return apply_edit(scene, i, t, v)


@dataclasses.dataclass(frozen=True)
class Clip:
    """A short video: one scene per frame, one caption per frame (frame 0: the scene; then
    what changed), and a prompt summarising the whole clip."""

    scenes: tuple[scene_lib.Scene, ...]
    captions: tuple[str, ...]
    prompt: str


def video_step(image_size: int) -> int:
    """Pixels a moving object travels between two frames."""
    return max(1, image_size // 16)


def sample_clip(rng: np.random.Generator, scene: scene_lib.Scene, num_frames: int,
                first_caption: str) -> Clip | None:
    """A clip of `num_frames` frames starting at `scene`: one object moves steadily in one
    direction; with probability 1/2 one object changes colour at one random frame. None when
    no object can move for the whole clip."""
    step = video_step(scene.image_size)
    movers = []
    for i in range(len(scene.objects)):
        if scene_lib.refer(scene, i) is None:
            continue
        obj = scene.objects[i]
        for d, (dx, dy) in DIRECTIONS.items():
            far = (num_frames - 1) * step
            path_ok = all(scene_lib.fits(scene, obj.replace(x=obj.x + dx * k, y=obj.y + dy * k),
                                         ignore=i) for k in range(step, far + 1, step))
            if path_ok:
                movers.append((i, d))
    if not movers:
        return None
    mover, direction = movers[int(rng.integers(len(movers)))]
    dx, dy = DIRECTIONS[direction]
    recolour_at = int(rng.integers(1, num_frames)) if rng.random() < 0.5 else -1
    scenes, captions = [scene], [first_caption]
    prompt = [f"{scene_lib.refer(scene, mover)} moves {_MOVE_PHRASES[direction]}"]
    for t in range(1, num_frames):
        prev = scenes[-1]
        moved = prev.objects[mover]
        events = [f"{scene_lib.refer(prev, mover)} moves {_MOVE_PHRASES[direction]}"]
        cur = _replaced(prev, mover, moved.replace(x=moved.x + dx * step, y=moved.y + dy * step))
        if t == recolour_at:
            edit = sample_edit(rng, cur, "recolour")
            if edit is not None:
                # Named in the frame before the change, as a viewer would.
                events.append(edit.narration)
                prompt.append(f"then {edit.narration}")
                cur = edit.target
        scenes.append(cur)
        captions.append(" and ".join(events))
    return Clip(tuple(scenes), tuple(captions), ", ".join(prompt))
