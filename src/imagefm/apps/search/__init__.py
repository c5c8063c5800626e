"""Image search: index a folder of photos, search it by text (English, Korean...) or by image.

    from imagefm.apps.search import Index

    index = Index.build("photos/", "photos.index", model="checkpoints/clip")
    index.search("빨간 자동차", k=10)

Modules: ``walker`` (finding and reading image files), ``store`` (SQLite: metadata and vectors,
the source of truth), ``vectors`` (FAISS: exact or approximate search), ``index`` (the ``Index``
that ties them to a model), ``gallery`` (an HTML page of results). FAISS is imported only when
an index is built, opened or searched.
"""

from __future__ import annotations

from imagefm.apps.search.index import (
    Index,
    IndexReport,
    SearchHit,
    SearchIndexError,
    model_fingerprint,
)
from imagefm.apps.search.vectors import KINDS, VectorIndex, VectorIndexConfig
from imagefm.apps.search.walker import IMAGE_EXTENSIONS, walk_images

__all__ = ["IMAGE_EXTENSIONS", "KINDS", "Index", "IndexReport", "SearchHit", "SearchIndexError",
           "VectorIndex", "VectorIndexConfig", "model_fingerprint", "walk_images"]
