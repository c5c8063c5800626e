"""The forgetting check: zero-shot accuracy on a reference set, before and after adaptation.

A reference is what the model could do before it met the target domain. Three kinds, named by
a string (``--reference`` on the command line):

* ``synthetic:colour,shape`` — the synthetic zero-shot suites (:mod:`imagefm.eval.suites`),
  mean top-1 over the named suites, English;
* ``zeroshot:PATH`` (or a bare ``PATH``) — zero-shot classification of labelled data (shards or
  a class-per-folder tree), prompt-ensembled as ``imagefm eval`` does;
* ``retrieval:PATH`` — image → text recall@1 on captioned shards (e.g. the Tux Paint ``test``
  split of ``imagefm data prepare tuxpaint``), English captions.

Each has a *validation* part (used to choose WiSE-FT's α) and a disjoint *test* part (what the
report shows): other seeds for synthetic suites, alternate images for data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefm.config import ConfigError

PARTS = ("val", "test")


@dataclass
class Reference:
    kind: str  # synthetic | zeroshot | retrieval
    target: str  # suite names, or a path
    n: int = 200  # synthetic images per suite
    lang: str = "en"
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    _kept: dict[str, Any] = field(default_factory=dict, repr=False)
    _data: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.target}"

    def accuracy(self, model: Any, processor: Any, part: str = "test") -> float:
        """Zero-shot accuracy (a fraction) of ``model`` on this reference's ``part``."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if self.kind == "synthetic":
            from imagefm.eval.suites import run_suite

            seed = 1 if part == "val" else 0
            scores = [run_suite(model, processor, suite, self.lang, self.n, seed)["top1"]
                      for suite in self.target.split(",")]
            return sum(scores) / len(scores)
        from imagefm.adapt.head import text_head
        from imagefm.adapt.tune import class_prompts
        from imagefm.apps.zeroshot import class_embeddings, embed_texts, logit_parts
        from imagefm.eval.retrieval import retrieval_metrics

        images = self._image_embeddings(model, processor, part)
        if self.kind == "zeroshot":
            data = self._labelled()
            labels = data.labels[PARTS.index(part)::2][self._kept[part]]
            head = text_head(class_embeddings(model, processor,
                                              class_prompts(data.classnames, self.lang)),
                             *logit_parts(model))
            return float((head.logits(images).argmax(dim=-1) == labels).float().mean())
        records = [self._records()[PARTS.index(part)::2][i] for i in self._kept[part].tolist()]
        texts = [(row, text) for row, r in enumerate(records) for text in r.captions_in(self.lang)]
        embeds = embed_texts(model, processor, [t for _, t in texts])
        metrics = retrieval_metrics(images @ embeds.t(), [row for row, _ in texts], (1,))
        return float(metrics["image_to_text"]["R@1"])

    def _image_embeddings(self, model: Any, processor: Any, part: str) -> Any:
        """Normalised image embeddings of ``part``; the image tower runs once per distinct
        tower weights (adaptation methods that lock it reuse its features)."""
        from imagefm.adapt.features import extract_features, feature_fingerprint, project

        key = (feature_fingerprint(model), part)
        if key not in self._cache:
            if self.kind == "zeroshot":
                images = self._labelled().images[PARTS.index(part)::2]
            else:
                images = [r.image for r in self._records()[PARTS.index(part)::2]]
            features = extract_features(model, processor, images)
            self._kept[part] = features.kept
            self._cache[key] = features.pre
        return project(model, self._cache[key])

    def _labelled(self) -> Any:
        if "labelled" not in self._data:
            from imagefm.adapt.data import load_labelled

            data = load_labelled(self.target)
            if "test" in data.splits:
                data = data.split("test")
            self._data["labelled"] = data
        return self._data["labelled"]

    def _records(self) -> list[Any]:
        if "records" not in self._data:
            from imagefm.data.formats import SkipCounter, read_shards

            records = [r for r in read_shards(self.target, SkipCounter())
                       if r.image is not None and r.captions_in(self.lang)]
            if any(r.split == "test" for r in records):
                records = [r for r in records if r.split == "test"]
            if len(records) < 4:
                raise ValueError(f"{self.target}: too few captioned images in {self.lang!r} "
                                 "for a retrieval reference")
            self._data["records"] = records
        return self._data["records"]


def parse_reference(text: str, n: int = 200, lang: str = "en") -> Reference:
    """A :class:`Reference` from its command-line form (see the module docstring)."""
    kind, sep, target = text.partition(":")
    if not sep or kind not in ("synthetic", "zeroshot", "retrieval"):
        kind, target = "zeroshot", text
    if kind == "synthetic":
        from imagefm.eval.suites import SUITES

        suites = [s.strip() for s in target.split(",") if s.strip()]
        unknown = [s for s in suites if s not in SUITES]
        if unknown or not suites:
            raise ConfigError(f"--reference synthetic:{target}: unknown suite(s) {unknown}; "
                              f"choose among {', '.join(SUITES)}")
        return Reference("synthetic", ",".join(suites), n, lang)
    if not Path(target).exists():
        raise FileNotFoundError(f"--reference {text}: {target} does not exist")
    return Reference(kind, target, n, lang)
