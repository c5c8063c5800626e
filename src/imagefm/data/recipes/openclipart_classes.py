"""Open Clip Art drawings labelled with CIFAR-10's classes (recipe ``openclipart-cifar10``).

A clip-art domain for the photo → drawing domain-shift example of ``imagefm adapt``. Debian's
``openclipart-png`` has no labels, only category folders and file names, so a drawing gets a
CIFAR-10 class by three kinds of rules, applied in this order:

1. **exclusions**: file stems that the rules below would get wrong (a plush toy penguin, a
   cooked turkey, a bat filed under birds, sailing diagrams...), listed in ``EXCLUDED`` with
   the reason; and every drawing of which *any* exact copy is filed under a folder of signs,
   icons, flags, logos or food (``SKIP_FOLDERS``: a car on a road sign, a hot dog);
2. **folders** whose every drawing is of one class (``FOLDER_CLASSES``: ``animals/birds`` →
   bird, ``animals/mammals/housecats`` → cat...);
3. **title words** (``WORD_CLASSES``), whole words of the title derived from the file name
   (as the ``openclipart`` recipe does; digits cut off, so ``rana01`` is ``rana``): English and
   the Italian of the collection's most prolific author (``cavallo`` → horse, ``gatto`` → cat).
   Brand and model names (``skoda``, ``hummer``) count only under ``transportation/``.

A drawing whose rules name two classes (``cani e gatti``: dogs and cats) is skipped as
ambiguous. CIFAR-10's own definitions are followed: *automobile* is cars, SUVs and the like,
*truck* only big trucks (no pickups, buses, vans or tanks). The labels were checked by eye on
contact sheets of every class (docs/results.md).

Pictures: exact duplicates (same bytes, e.g. a drawing filed in two folders) are kept once;
transparent pixels are composited on white (most drawings are RGBA on a transparent
background, which would otherwise decode as black) and the result is re-encoded as PNG, at most
``MAX_SIDE`` pixels on its longer side; undecodable files are skipped and counted.

Split: per class, a seeded order of the drawings (sha1 of ``seed:stem``, so adding a drawing
never reshuffles the others); the first ``train_per_class`` are ``train`` (few-shot training
and validation when clip-art is the target domain), the rest ``test``. Classes with fewer
than ``MIN_PER_CLASS`` drawings are left out (in Debian's 1:0.18 package: truck 7, ship 6,
frog 5, deer 2). Labels are CIFAR-10 names; indices are renumbered over the classes kept, in
CIFAR-10 order.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from imagefm.data.formats import SkipCounter, safe_key
from imagefm.data.recipes.base import Recipe, iter_files, register
from imagefm.data.recipes.cifar10 import CLASSES
from imagefm.data.recipes.openclipart import DEFAULT_SRC, LICENSE, find_authors, title_from_stem
from imagefm.data.records import Caption, Record

MAX_SIDE = 512
TRAIN_PER_CLASS = 6
MIN_PER_CLASS = 8  # fewer drawings than this: the class is left out (too few to test on)
SEED = 0

# Drawings here are symbols, not pictures of the object (a car on a road sign, a hot dog).
SKIP_FOLDERS = ("computer", "food", "logos", "signs_and_symbols", "transportation/aiga-symbols",
                "transportation/roadsigns")

# Folders whose drawings are all of one class (a prefix also covers its sub-folders).
FOLDER_CLASSES = {
    "animals/amphibian": "frog",
    "animals/birds": "bird",
    "animals/mammals/dogs": "dog",
    "animals/mammals/horses": "horse",
    "animals/mammals/housecats": "cat",
}

# Whole title words → class. Plural "s" is accepted for every word.
WORD_CLASSES = {
    "airplane": ("airplane", "aeroplane", "plane", "aircraft", "airliner", "jet", "biplane",
                 "aereo", "aeroplano"),
    "automobile": ("car", "auto", "autos", "automobile", "sedan", "sportcar", "redcar",
                   "coupe", "cabriolet", "limousine", "jeep"),
    "bird": ("bird", "birds", "uccello", "uccelli", "eagle", "aquila", "acquila", "owl", "gufo",
             "crow", "dove", "duck", "gull", "seagull", "gabbiano", "swan", "cigno", "cigni",
             "hen", "rooster", "gallo", "pollo", "tacchino", "penguin", "pinguino", "puffin",
             "cormorant", "flamingo", "flamand", "parrot", "pigeon", "sparrow", "robin"),
    "cat": ("cat", "gatto", "gatti", "gattina", "kitten", "kitty"),
    "deer": ("deer", "reindeer", "fawn", "cervo", "stag", "elk", "moose"),
    "dog": ("dog", "cane", "cani", "puppy", "beagle", "bulldog", "poodle", "terrier"),
    "frog": ("frog", "toad", "rana"),
    "horse": ("horse", "cavallo", "pony", "stallion"),
    "ship": ("ship", "boat", "sailboat", "yacht", "trawler", "barca", "nave", "steamer",
             "ferry", "galleon"),
    "truck": ("truck", "lorry", "camion", "firetruck"),
}
PHRASE_CLASSES = {"fire engine": "truck"}
# Make and model names: only meaningful for drawings filed under transportation/.
BRAND_CLASSES = {
    "automobile": ("chevrolet", "dodge", "skoda", "shelby", "toyota", "blazer", "bmw"),
}
TRANSPORT = "transportation"

# Stems the rules above get wrong, with why (checked by eye on the contact sheets). Near copies
# (a recolouring, outline or labelled version of a kept drawing) go too, so that the train and
# test splits never hold the same drawing twice.
EXCLUDED = {
    # bird
    "baby-tux_alex_kuehne_01": "Tux, the Linux mascot",
    "baby_tux_rory_mccann_01": "Tux, the Linux mascot",
    "ninja_tux_rory_mccann_01": "Tux, the Linux mascot",
    "manager_mimooh_01": "a penguin mascot in Tux's style",
    "plush_tux_anita_01": "a plush toy",
    "rubber_duck1_ganson": "a toy",
    "rubber_duck2_ganson": "a toy",
    "rubber_ducks_ganson": "toys",
    "duck_yellow_ii_kurt_cagl_": "broken: shows 'Linked Image Not Found'",
    "mirjam_meijer_mirjam_mei_01": "a butterfly and flowers, filed under birds",
    "wing_mitchell_johnson_si_": "a lone wing",
    "contour_bat": "a bat, filed under birds",
    "turkey_on_platter_01": "a roast turkey on a plate",
    "Tacchino_di_Natale": "a roast turkey",
    "flamand_bw_jean-victor_b_01": "near copy: black-and-white flamand_jean-victor_bali_01",
    "seagull_contour_nicu_buc_01": "near copy: outline of seagull_nicu_buculei_01",
    "ralf_ark.in-berlin.de_ra_01": "near copy of emperor_penguin_ralf_ste_01",
    # cat
    "cat_scrathing_post_benji_01": "a scratching post, no cat",
    "cartoon_vgcats_fanart_01": "a person with cat ears",
    "scodella_gatto_architett_01": "a cat's bowl",
    "set_gatti": "a cat's bowl and basket",
    "sleeping_cat_rgolan_sup_r": "near copy of sleeping_cat_ron_golan_01",
    # dog
    "dog_01_drawn_with_strai_02": "near copy of dog_02_drawn_with_strai_01",
    "dog_on_leash_gerald_g._02": "near copy of dog_on_leash_gerald_g._01",
    "dog_head_nicu_buculei_02": "near copy of dog_head_nicu_buculei_01",
    # automobile
    "shelby_cobra_blueprint_i_01": "a blueprint of faint lines",
    "shelby_cobra_car_bluepr_": "a blueprint of faint lines",
    "dodge_neon_pink_ganson": "near copy: dodge_neon_green_ganson recoloured",
    "1989_chevrolet_celebrit_02": "near copy of 1989_chevrolet_celebrit_01",
    "_chevrolet_celebirt_": "near copy of 1989_chevrolet_celebrit_01",
    # horse, ship, airplane
    "mechorse": "a faint sketch of a mechanical horse",
    "sailboat_illustration_labels": "near copy: sailboat_illustration with labels",
    "the_mad_little_ship_core_01": "a ship in a bottle",
    "toy_paper_plane_01": "a folded paper plane, not an aircraft",
}
# Stems no rule finds: the two "sailing_*" drawings that show boats (the others are diagrams).
INCLUDED = {"sailing_kids": "ship", "sailing_sunset": "ship"}

_TRAILING_DIGITS = re.compile(r"\d+$")


def title_words(title: str) -> list[str]:
    """Lower-case whole words of a title, trailing digits cut off (``rana01`` → ``rana``)."""
    words = []
    for word in re.split(r"[^a-z0-9]+", title.lower()):
        word = _TRAILING_DIGITS.sub("", word)
        if word:
            words.append(word)
    return words


def _in_folder(relative_dir: str, folder: str) -> bool:
    return relative_dir == folder or relative_dir.startswith(folder + "/")


def classes_by_rules(relative_path: str, title: str) -> set[str]:
    """Every CIFAR-10 class the folder and word rules give a drawing (before exclusions).

    ``relative_path`` is the PNG's path under the package root (``animals/birds/crow_01.png``),
    ``title`` its title from the file name (``crow``).
    """
    folder = relative_path.rpartition("/")[0]
    found = {cls for prefix, cls in FOLDER_CLASSES.items() if _in_folder(folder, prefix)}
    words = set(title_words(title))
    plural = {w[:-1] for w in words if w.endswith("s")} | {w[:-2] for w in words
                                                              if w.endswith("es")}
    vocabulary = words | plural
    for cls, keys in WORD_CLASSES.items():
        if vocabulary & set(keys):
            found.add(cls)
    joined = " ".join(title_words(title))
    found |= {cls for phrase, cls in PHRASE_CLASSES.items() if f" {phrase} " in f" {joined} "}
    if _in_folder(folder, TRANSPORT):
        found |= {cls for cls, keys in BRAND_CLASSES.items() if vocabulary & set(keys)}
    return found


def label_drawing(relative_paths: list[str], title: str, stem: str) -> tuple[str | None, str]:
    """``(class, why)`` for one distinct drawing filed at ``relative_paths``; class None = not
    labelled, and ``why`` says which rule decided (for the skip counts)."""
    if stem in EXCLUDED:
        return None, "excluded by name"
    if stem in INCLUDED:
        return INCLUDED[stem], "labelled"
    if any(_in_folder(p.rpartition("/")[0], f) for p in relative_paths for f in SKIP_FOLDERS):
        return None, "sign, icon or food folder"
    found: set[str] = set()
    for path in relative_paths:
        found |= classes_by_rules(path, title)
    if not found:
        return None, "not a CIFAR-10 class"
    if len(found) > 1:
        return None, "ambiguous: " + "+".join(sorted(found))
    return found.pop(), "labelled"


def on_white(data: bytes, max_side: int = MAX_SIDE) -> bytes:
    """The picture composited on white (alpha and palette transparency), as RGB PNG bytes,
    shrunk to ``max_side`` on its longer side; raises on undecodable data."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    rgb = canvas.convert("RGB")
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _order_key(stem: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{stem}".encode()).hexdigest()


def labelled_drawings(root: Path, skips: SkipCounter) -> list[tuple[str, str, Path, list[str]]]:
    """``(class, title, first path, every relative path)`` of each distinct labelled drawing,
    exact duplicates merged; unlabelled drawings are counted in ``skips`` by reason."""
    files = list(iter_files(root, (".png",)))
    authors = find_authors([p.stem for p in files])
    copies: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        copies[hashlib.sha1(path.read_bytes()).hexdigest()].append(path)
    found = []
    for paths in copies.values():
        first = paths[0]
        relative = [p.relative_to(root).as_posix() for p in paths]
        title = title_from_stem(first.stem, authors)
        cls, why = label_drawing(relative, title, first.stem)
        for copy in relative[1:]:
            skips.add("duplicate image", f"{copy}: same bytes as {relative[0]}")
        if cls is None:
            skips.add(why if not why.startswith("ambiguous") else "ambiguous",
                      f"{relative[0]} ({title!r}): {why}")
            continue
        found.append((cls, title, first, relative))
    return found


def build(root: Path, skips: SkipCounter, train_per_class: int = TRAIN_PER_CLASS,
          min_per_class: int = MIN_PER_CLASS, seed: int = SEED) -> Iterator[Record]:
    """One labelled record per distinct drawing of a CIFAR-10 class, split per class; classes
    with fewer than ``min_per_class`` drawings are left out (and counted)."""
    from imagefm.data.image import ImageDecodeError

    by_class: dict[str, list[tuple[str, str, Path, list[str]]]] = defaultdict(list)
    for drawing in labelled_drawings(root, skips):
        by_class[drawing[0]].append(drawing)
    present = [c for c in CLASSES if len(by_class[c]) >= min_per_class]
    for cls in CLASSES:
        if 0 < len(by_class[cls]) < min_per_class:
            for drawing in by_class[cls]:
                skips.add("class with too few drawings",
                          f"{drawing[3][0]}: {cls} has {len(by_class[cls])} < {min_per_class}")
    for cls in present:
        members = sorted(by_class[cls], key=lambda d: _order_key(d[2].stem, seed))
        kept = 0
        for cls_name, title, path, relative in members:
            try:
                image = on_white(path.read_bytes())
            except (OSError, ValueError, ImageDecodeError) as err:  # PIL's errors are OSError
                skips.add("undecodable image", f"{relative[0]}: {err}")
                continue
            split = "train" if kept < train_per_class else "test"
            kept += 1
            key = safe_key("openclipart-" + Path(relative[0]).with_suffix("").as_posix()
                           .replace("/", "-"), unique=True)
            yield Record(key=key, image=image, image_ext="png",
                         captions=[Caption(f"clip art of {_article(cls_name)} {cls_name}.",
                                           "en")], label=present.index(cls_name),
                         label_name=cls_name, split=split, source="openclipart",
                         license="public domain",
                         meta={"name": path.stem, "path": relative[0], "title": title,
                               "copies": relative})


def count(root: Path) -> int:
    return sum(1 for _ in iter_files(root, (".png",)))


RECIPE = register(Recipe(
    name="openclipart-cifar10",
    summary="Open Clip Art drawings of CIFAR-10's classes (Debian openclipart-png), labelled "
            "by folder and title rules",
    license=LICENSE,
    install="Install them with: sudo apt-get install -y openclipart-png "
            "(or pass --src DIR pointing at the package's png folder).",
    build=build,
    default_src=DEFAULT_SRC,
    debian_package="openclipart-png",
    count=count,
    notes="Class from folder and title-word rules with an exclusion list "
          "(imagefm.data.recipes.openclipart_classes); labels checked by eye. Transparency "
          f"composited on white, longer side at most {MAX_SIDE} px. Exact duplicates kept once.",
    split_rule=f"per class, drawings in sha1('{SEED}:'+stem) order: the first "
               f"{TRAIN_PER_CLASS} train, the rest test; classes with fewer than "
               f"{MIN_PER_CLASS} drawings left out",
))
