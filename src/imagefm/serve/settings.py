"""Server settings: limits, batching and security, with defaults safe for a laptop."""

from __future__ import annotations

from dataclasses import dataclass

from imagefm.config import INFERENCE_PRECISIONS, check_choice


@dataclass
class ServeSettings:
    """Everything ``imagefm serve`` can tune. Defaults bind to loopback only."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    model_name: str | None = None  # the id clients send as "model"; default: the folder name
    # Dynamic batching (max_batch=1 turns it off: one request at a time on the model).
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024  # items waiting per batcher before requests are refused (429)
    timeout_s: float = 30.0  # longest a request waits for the model (504 after)
    # Input limits.
    max_request_bytes: int = 16 * 2**20  # whole request body (413 above)
    max_image_pixels: int = 40_000_000  # per image, checked from the header before decoding
    max_inputs: int = 256  # texts/images in one embeddings request
    max_text_chars: int = 2000
    max_labels: int = 100  # zero-shot labels per request
    max_k: int = 100  # search results per request
    decode_threads: int = 4  # image decoding runs beside the model thread
    precision: str = "fp32"  # the model's forward passes: fp32, or bf16 (bfloat16 autocast)
    classifier_cache: int = 32  # label sets whose text embeddings are kept
    # Chat completions (a served VLM or LM), decoded on one worker thread with continuous
    # batching (serve/continuous.py): up to chat_slots replies decode together, one token each
    # per step; chat_slots=1 answers one request at a time.
    chat_slots: int = 8
    max_new_tokens: int = 512  # most tokens one reply may generate (the default when unasked)
    max_chat_images: int = 8  # images in one chat request
    max_prompt_chars: int = 100_000  # text in one chat request, checked before tokenising
    max_chat_queue: int = 32  # chat requests decoding or waiting before answering 429
    # Where chat images may come from besides data: URLs (serve/image_sources.py): hosts whose
    # http(s) image URLs are fetched ("*": any host, which lets clients make the server reach
    # whatever it can reach) and a folder whose files image_url may name. Neither by default.
    image_url_hosts: tuple[str, ...] = ()
    image_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_request_bytes", "max_image_pixels",
                     "max_inputs", "max_text_chars", "max_labels", "max_k", "decode_threads",
                     "max_new_tokens", "max_chat_images", "max_prompt_chars", "max_chat_queue",
                     "chat_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        check_choice("precision", self.precision, INFERENCE_PRECISIONS)
        self.image_url_hosts = tuple(h.strip() for h in self.image_url_hosts if h.strip())

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")
