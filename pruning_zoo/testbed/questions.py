"""Questions about a scene, in five families, each with its one-word answer and its evidence: the patches of
the 24x24 grid the answer depends on (the objects one must look at)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

from pruning_zoo.testbed.scenes import CHARACTERS, COLORS, SHAPES, SIZE, Scene, SceneObject

FAMILIES = ("attribute", "existence", "counting", "spatial", "reading")
NEGATIVE_KINDS = ("random", "popular", "adversarial")  # POPE's three ways of choosing absent objects
#: Half of the image -> (axis, sign): the object's centre minus the image centre has that sign on that axis.
HALVES = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}
NUMBERS = ("one", "two", "three", "four", "five", "six")


@dataclasses.dataclass(frozen=True)
class Question:
    scene_seed: int
    family: str
    question: str
    answer: str
    #: Patch indices (row * 24 + col) the answer depends on; empty when nothing in the image is (an absent
    #: object with no look-alike).
    evidence: tuple[int, ...]
    #: For existence questions answered "no": how the absent object was chosen.
    negative: str | None = None


def _evidence(*objects: SceneObject) -> tuple[int, ...]:
    return tuple(sorted({p for obj in objects for p in obj.patches}))


def _unique(scene: Scene, key) -> list[SceneObject]:
    counts = Counter(key(o) for o in scene.objects)
    return [o for o in scene.objects if counts[key(o)] == 1]


def attribute(scene: Scene, rng: random.Random) -> Question | None:
    by_shape, by_color = _unique(scene, lambda o: o.shape), _unique(scene, lambda o: o.color)
    options = [("color", o) for o in by_shape] + [("shape", o) for o in by_color]
    if not options:
        return None
    asked, obj = rng.choice(options)
    if asked == "color":
        return Question(scene.seed, "attribute", f"what color is the {obj.shape} ?", obj.color, _evidence(obj))
    return Question(scene.seed, "attribute", f"what shape is the {obj.color} object ?", obj.shape, _evidence(obj))


def existence(scene: Scene, rng: random.Random) -> Question | None:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        obj = rng.choice(scene.objects)
        return Question(scene.seed, "existence", f"is there a {obj.color} {obj.shape} ?", "yes", _evidence(obj))
    colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
    candidates = {
        "random": [(c, s) for c in COLORS for s in SHAPES if s not in shapes],
        "popular": [(c, s) for c in COLORS if c not in colors for s in shapes],
        "adversarial": [(c, s) for c in colors for s in shapes if (c, s) not in present],
    }
    kinds = [kind for kind in NEGATIVE_KINDS if candidates[kind]]
    if not kinds:
        return None
    kind = rng.choice(kinds)
    color, shape = rng.choice(sorted(candidates[kind]))
    # To rule the object out one looks at everything sharing its colour or shape.
    lookalikes = [o for o in scene.objects if o.color == color or o.shape == shape]
    return Question(scene.seed, "existence", f"is there a {color} {shape} ?", "no", _evidence(*lookalikes), kind)


def counting(scene: Scene, rng: random.Random) -> Question | None:
    if rng.random() < 0.5:
        color = rng.choice(sorted({o.color for o in scene.objects}))
        matching = [o for o in scene.objects if o.color == color]
        text = f"how many {color} objects are there ?"
    else:
        shape = rng.choice(sorted({o.shape for o in scene.objects}))
        matching = [o for o in scene.objects if o.shape == shape]
        text = f"how many {shape} objects are there ?"
    return Question(scene.seed, "counting", text, NUMBERS[len(matching) - 1], _evidence(*matching))


def spatial(scene: Scene, rng: random.Random) -> Question | None:
    """Where an object lies in the image: "is the red circle in the left half of the image ?"."""
    named = [o for o in _unique(scene, lambda o: (o.color, o.shape))
             if abs(o.x - SIZE / 2) > 30 or abs(o.y - SIZE / 2) > 30]
    if not named:
        return None
    obj = rng.choice(named)
    sides = [side for side, (axis, _) in HALVES.items() if abs((obj.x, obj.y)[axis] - SIZE / 2) > 30]
    side = rng.choice(sides)
    axis, sign = HALVES[side]
    holds = ((obj.x, obj.y)[axis] - SIZE / 2) * sign > 0
    return Question(scene.seed, "spatial", f"is the {obj.name} in the {side} half of the image ?",
                    "yes" if holds else "no", _evidence(obj))


def reading(scene: Scene, rng: random.Random) -> Question | None:
    labelled = [o for o in _unique(scene, lambda o: (o.color, o.shape)) if o.label is not None]
    if not labelled:
        return None
    obj = rng.choice(labelled)
    return Question(scene.seed, "reading", f"what is written on the {obj.name} ?", obj.label.lower(), _evidence(obj))


MAKERS = {"attribute": attribute, "existence": existence, "counting": counting, "spatial": spatial, "reading": reading}


def questions_for(scene: Scene, families=FAMILIES, seed: int | None = None) -> list[Question]:
    """One question per family where the scene allows it, drawn with a generator seeded from the scene."""
    rng = random.Random((scene.seed if seed is None else seed) * 31 + 17)
    result = []
    for family in families:
        question = MAKERS[family](scene, rng)
        if question is not None:
            result.append(question)
    return result


def vocabulary() -> list[str]:
    """Every word a question or an answer can use, in a fixed order."""
    words = ["what", "color", "is", "the", "shape", "object", "objects", "there", "a", "how", "many", "are",
             "written", "on", "left", "right", "of", "above", "below", "?", "yes", "no"]
    words += list(COLORS) + list(SHAPES) + list(NUMBERS) + [c.lower() for c in CHARACTERS]
    words += ["in", "half", "image", "top", "bottom"]  # appended last: earlier ids stay put
    return list(dict.fromkeys(words))
