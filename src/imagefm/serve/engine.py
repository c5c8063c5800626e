"""The model side of the server: decoding, batched embedding, zero-shot and index search.

Every model call runs on one thread (``model_thread``), so batches never overlap and the model
needs no locking; image decoding runs on a small pool beside it, so a slow or huge image never
holds the model up. Text and image requests have a dynamic batcher each.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import threading
import unicodedata
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from imagefm.serve.batching import DynamicBatcher
from imagefm.serve.settings import ServeSettings

THUMBNAIL_CACHE = 512  # thumbnails kept in memory (a few MB)

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,",
                       re.IGNORECASE)


class BadInput(ValueError):
    """A request the server cannot use (HTTP 400), with a message naming the bad part."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_base64_image(data: str, where: str) -> bytes:
    """Bytes of a base64 string or ``data:image/...;base64,`` URL."""
    if not isinstance(data, str) or not data:
        raise BadInput(f"{where}: expected a base64 image or a data URL, got an empty value")
    match = _DATA_URL.match(data)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise BadInput(f"{where}: data URL of type {mime!r} is not an image")
        data = data[match.end():]
    elif data.startswith("data:"):
        raise BadInput(f"{where}: only base64 data URLs are accepted (data:image/...;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        # Line-wrapped base64 (MIME, PEM) has whitespace, which strict decoding refuses. Strip
        # it only then: scanning every request's string with a regex cost ~14 % of the event
        # loop's time on image requests (py-spy, benchmarks/bench_search.py server part).
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadInput(f"{where}: not valid base64") from None
    if not raw:
        raise BadInput(f"{where}: the image is empty")
    return raw


class Engine:
    """Model, processor and (optional) index behind the HTTP routes."""

    def __init__(self, model: Any, processor: Any = None, index: Any = None,
                 settings: ServeSettings | None = None, model_name: str = "model") -> None:
        from imagefm.apps.zeroshot import check_precision, model_device
        from imagefm.data.image import ImageProcessor
        from imagefm.processor import Processor

        self.model = model.eval() if hasattr(model, "eval") else model
        self.processor = processor or Processor.for_model(model)
        self.index = index
        self.settings = settings or ServeSettings()
        check_precision(self.settings.precision, model_device(self.model))
        self.model_name = model_name
        self.image_processor = ImageProcessor(self.processor.image_processor.card,
                                              max_pixels=self.settings.max_image_pixels)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="imagefm-model")
        self.decode_pool = ThreadPoolExecutor(self.settings.decode_threads,
                                              thread_name_prefix="imagefm-decode")
        s = self.settings
        self.text_batcher: DynamicBatcher[str, tuple[np.ndarray, int]] = DynamicBatcher(
            self._text_batch, self.model_thread, max_batch=s.max_batch,
            max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue, name="text")
        self.image_batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
            self._image_batch, self.model_thread, max_batch=s.max_batch,
            max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue, name="image")
        self._classifiers: OrderedDict[tuple[tuple[str, ...], str], Any] = OrderedDict()
        self._classifiers_lock = threading.Lock()
        self._thumbnails: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._thumbnails_lock = threading.Lock()

    async def start(self) -> None:
        await self.text_batcher.start()
        await self.image_batcher.start()

    async def stop(self) -> None:
        await self.text_batcher.stop()
        await self.image_batcher.stop()
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def embed_dim(self) -> int:
        dim = getattr(getattr(self.model, "config", None), "embed_dim", None)
        if isinstance(dim, int):
            return dim
        return int(self.index.dim) if self.index is not None else 0

    # --- batch functions (model thread) -------------------------------------------------------

    def _text_batch(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        from imagefm.apps.zeroshot import encode_tokens

        batch = self.processor(texts=texts)
        mask = batch.get("attention_mask")
        vectors = encode_tokens(self.model, batch, self.settings.precision).numpy()
        counts = mask.sum(dim=1).tolist() if mask is not None else [0] * len(texts)
        return list(zip(vectors, (int(c) for c in counts), strict=True))

    def _image_batch(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        from imagefm.apps.zeroshot import embed_pixels

        return list(embed_pixels(self.model, torch.from_numpy(np.stack(pixels)),
                                 self.settings.precision).numpy())

    # --- requests (event loop) ----------------------------------------------------------------

    def check_text(self, text: Any, where: str) -> str:
        if not isinstance(text, str):
            raise BadInput(f"{where}: expected a string")
        text = unicodedata.normalize("NFC", text)
        if not text.strip():
            raise BadInput(f"{where}: the text is empty")
        if len(text) > self.settings.max_text_chars:
            raise BadInput(f"{where}: {len(text)} characters is more than the limit of "
                           f"{self.settings.max_text_chars}", status=413)
        return text

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Unit embeddings ``[N, D]`` and the number of tokens used."""
        results = await self.text_batcher.submit_many(texts, self.settings.timeout_s)
        return np.stack([vector for vector, _ in results]), sum(n for _, n in results)

    async def decode_images(self, blobs: list[bytes], names: list[str]) -> list[np.ndarray]:
        """Preprocessed pixels ``[3, S, S]`` per image; the first bad one raises ``BadInput``."""
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.decode_pool, self._preprocess, blob, name)
                for blob, name in zip(blobs, names, strict=True)]
        return list(await asyncio.gather(*jobs))

    def _preprocess(self, blob: bytes, name: str) -> np.ndarray:
        from imagefm.data.image import ImageDecodeError, open_image

        try:
            image = open_image(blob, name=name, max_pixels=self.settings.max_image_pixels)
            return self.image_processor.preprocess_one(image)
        except ImageDecodeError as err:
            # Too many pixels is a size limit (413), anything else a bad image (400).
            status = 413 if "decompression bomb" in err.reason else 400
            raise BadInput(f"{name}: cannot decode the image: {err.reason}", status) from None

    async def embed_images(self, blobs: list[bytes], names: list[str]) -> np.ndarray:
        pixels = await self.decode_images(blobs, names)
        vectors = await self.image_batcher.submit_many(pixels, self.settings.timeout_s)
        return np.stack(vectors)

    async def classify(self, blob: bytes, labels: list[str], lang: str
                       ) -> tuple[list[tuple[str, float, float]], bool]:
        """``[(label, probability, logit)]`` best first, and whether probabilities are
        independent sigmoids (SigLIP) rather than a softmax over the labels (CLIP)."""
        classifier = await asyncio.get_running_loop().run_in_executor(
            self.model_thread, self._classifier, tuple(labels), lang)
        vector = (await self.embed_images([blob], ["image"]))[0]
        logits = classifier.logits_from_embeddings(torch.from_numpy(vector)[None])[0]
        probs = torch.sigmoid(logits) if classifier.sigmoid else logits.softmax(dim=-1)
        order = torch.argsort(probs, descending=True).tolist()
        return ([(classifier.classnames[i], float(probs[i]), float(logits[i])) for i in order],
                classifier.sigmoid)

    def _classifier(self, labels: tuple[str, ...], lang: str) -> Any:
        """A zero-shot classifier per (labels, language), kept in a small LRU cache: building
        one embeds every label in every template."""
        from imagefm.apps.zeroshot import ZeroShotClassifier

        key = (labels, lang)
        with self._classifiers_lock:
            if key in self._classifiers:
                self._classifiers.move_to_end(key)
                return self._classifiers[key]
        try:
            classifier = ZeroShotClassifier(self.model, self.processor, list(labels), lang=lang)
        except ValueError as err:  # unknown language, empty label...
            raise BadInput(str(err)) from None
        with self._classifiers_lock:
            self._classifiers[key] = classifier
            while len(self._classifiers) > self.settings.classifier_cache:
                self._classifiers.popitem(last=False)
        return classifier

    async def search(self, vector: np.ndarray, k: int) -> list[Any]:
        if self.index is None:
            raise BadInput("this server has no index: start it with --index INDEX", status=404)
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(None, self.index.search_vectors, vector[None], k)
        return hits[0]

    async def thumbnail(self, image_id: int, size: int) -> bytes | None:
        """A JPEG thumbnail of an indexed image, or None when there is no such file."""
        if self.index is None:
            return None
        path = self.index.image_path(image_id)
        if path is None:
            return None
        key = (int(image_id), size)
        with self._thumbnails_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.decode_pool, _thumbnail, str(path), size,
                                          self.settings.max_image_pixels)
        if data is not None:
            with self._thumbnails_lock:
                self._thumbnails[key] = data
                while len(self._thumbnails) > THUMBNAIL_CACHE:
                    self._thumbnails.popitem(last=False)
        return data


def _thumbnail(path: str, size: int, max_pixels: int) -> bytes | None:
    from imagefm.apps.search.gallery import thumbnail_jpeg

    try:
        return thumbnail_jpeg(path, size, max_pixels)
    except (OSError, ValueError):
        return None
