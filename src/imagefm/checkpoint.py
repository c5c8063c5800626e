"""The ground floor of loading and saving: our checkpoint format, errors, atomic writes and
weight-file reading. It imports no model and no converter (imagefm.loading, above ``convert/``,
turns a path or hub id into a model).

An imagefm checkpoint is a directory:
    model.safetensors     weights (no pickle, ever)
    imagefm.json          {"format": "imagefm", "architecture", "config", "preprocess", "tokenizer"}
    tokenizer.json, ...   the tokenizer's own files, when the model has one
    chat_template.jinja   a language model's chat template, when it has its own
    README.md             a model card with the Hub's metadata header

A quantised language model (``imagefm quantize``) stores each quantised layer as its blocks
(``<layer>.qweight``, ``.scales``): loading puts quantised layers back in their places.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from imagefm.model_card import CARD_FILE, model_card
from imagefm.version import __version__

FORMAT_NAME = "imagefm"
FORMAT_VERSION = 1
CONFIG_FILE = "imagefm.json"
WEIGHTS_FILE = "model.safetensors"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class CheckpointError(ValueError):
    """A checkpoint cannot be read: the message says which file and why."""


# --- atomic writes -------------------------------------------------------------------------------

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once: os.umask can only be read by setting it


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates the file 0600; give it the mode any new file gets (0666 - umask), so a
        # server running as another user (a container) can read the models written here.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path,
                    metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically (tied weights are stored once per name)."""
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# --- how weights are read: dtype and where parameters live ---------------------------------------
# The loading layer (imagefm.loading) sets these for the duration of one load, so every converter
# reads weights the same way without each one growing dtype/device arguments.

@dataclass(frozen=True)
class LoadOptions:
    """``dtype``: floating tensors are converted to it as they are read (None: as stored).
    ``empty_init``: models built inside :func:`empty_parameters` get their parameters on the meta
    device, and loaders assign the checkpoint's tensors instead of copying into fresh ones."""

    dtype: torch.dtype | None = None
    empty_init: bool = False


_DEFAULT_OPTIONS = LoadOptions()  # frozen: safe to share
_OPTIONS: ContextVar[LoadOptions] = ContextVar("imagefm_load_options",
                                              default=_DEFAULT_OPTIONS)  # noqa: B039
_ASSIGNING: ContextVar[bool] = ContextVar("imagefm_assigning", default=False)


@contextmanager
def load_options(dtype: torch.dtype | None = None, empty_init: bool = False) -> Iterator[None]:
    token = _OPTIONS.set(LoadOptions(dtype, empty_init))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current_load_options() -> LoadOptions:
    return _OPTIONS.get()


def load_dtype(default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a converter gives floating weights in the current load (see load_options)."""
    return _OPTIONS.get().dtype or default


_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_",
                   "orthogonal_", "eye_")


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no random init).

    Buffers stay real: some are computed at construction and never saved. A loader then assigns
    every parameter from the checkpoint (``load_state_dict(..., assign=True)``), so a big model
    costs its weights once, in their final dtype, instead of a float32 copy plus the weights.
    A no-op unless the current :func:`load_options` ask for it.
    """
    if not current_load_options().empty_init:
        yield
        return
    original = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta and not _ASSIGNING.get():
            module._parameters[name] = torch.nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad)

    # Initialising a meta tensor computes nothing but still costs (the first call imports
    # torch._dynamo, seconds): the init functions skip meta tensors while we build.
    inits = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS
             if hasattr(torch.nn.init, name)}

    def skip_meta(init: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)
        return wrapped

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    for name, init in inits.items():
        setattr(torch.nn.init, name, skip_meta(init))
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]
        for name, init in inits.items():
            setattr(torch.nn.init, name, init)


def has_meta_parameters(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=False)``, assigning the tensors when the model was
    built with empty parameters (no copy: the checkpoint's tensors become the parameters)."""
    token = _ASSIGNING.set(True)  # the parameters assigned here are real, not to be emptied
    try:
        model.load_state_dict(state, strict=False, assign=has_meta_parameters(model))
    finally:
        _ASSIGNING.reset(token)


def _to_load_dtype(tensor: torch.Tensor) -> torch.Tensor:
    dtype = current_load_options().dtype
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


# --- reading weights -----------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    **({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
       if hasattr(torch, "float8_e4m3fn") else {}),
}


class LazyWeights(MutableMapping):
    """A state dict whose tensors are read from disk when first asked for, converted to the
    load dtype (see :func:`load_options`), and not kept: a key map that renames and assigns them
    holds each tensor once. Behaves as a dict otherwise (keys, ``in``, ``pop``, set items)."""

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]] | None = None) -> None:
        self._readers: dict[str, Callable[[], torch.Tensor]] = dict(readers or {})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._readers[key]()

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._readers[key] = lambda: value

    def __delitem__(self, key: str) -> None:
        del self._readers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def update_from(self, other: LazyWeights) -> None:
        self._readers.update(other._readers)


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        size = int.from_bytes(raw, "little")
        if size > 100_000_000:
            raise CheckpointError(f"{path} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not a safetensors file: {err}") from None
    return header, 8 + size


def read_safetensors(path: str | Path) -> LazyWeights:
    """The tensors of a safetensors file, each read with one ``readinto`` straight into its own
    storage when asked for. Unlike a memory map, nothing of the file stays resident afterwards,
    so the peak memory of a load is the model in its final dtype (benchmarks/bench_load.py)."""
    path = Path(path)
    header, data_start = safetensors_header(path)

    def reader(name: str, spec: dict[str, Any]) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            dtype = _SAFETENSORS_DTYPES.get(spec["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has dtype {spec['dtype']}, which "
                                      f"imagefm cannot read")
            begin, end = spec["data_offsets"]
            tensor = torch.empty(spec["shape"], dtype=dtype)
            buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
            if buffer is not None:
                if buffer.nbytes != end - begin:
                    raise CheckpointError(f"{path}: tensor {name} holds {end - begin} bytes, "
                                          f"its shape needs {buffer.nbytes}")
                with path.open("rb", buffering=0) as handle:
                    handle.seek(data_start + begin)
                    if handle.readinto(memoryview(buffer)) != buffer.nbytes:
                        raise CheckpointError(f"{path} is truncated (tensor {name})")
            return _to_load_dtype(tensor)
        return read

    return LazyWeights({name: reader(name, spec) for name, spec in header.items()
                        if name != "__metadata__"})


def load_state_dict_file(path: str | Path) -> LazyWeights:
    """Read a weights file. Safetensors always; a pickle (``.bin``, ``.pt``) only through
    ``torch.load(weights_only=True)``, which unpickles tensors and nothing else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    warnings.warn(f"{path.name} is a pickle: reading it with torch.load(weights_only=True), "
                  f"which loads tensors only; prefer safetensors", stacklevel=2)
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that holds more than tensors, and unpickling "
            f"it could run arbitrary code. Convert it to safetensors where you trust it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return LazyWeights({k: (lambda v=v: _to_load_dtype(v)) for k, v in state.items()})


def load_sharded(directory: Path, index_name: str) -> LazyWeights:
    """Read weights listed by a ``*.safetensors.index.json`` (HF sharded checkpoints)."""
    try:
        index = json.loads((directory / index_name).read_text())
        shards = sorted(set(index["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{directory / index_name} is not a valid shard index: "
                              f"{err}") from None
    state = LazyWeights()
    for shard in shards:
        state.update_from(load_state_dict_file(directory / shard))
    return state


# --- our format ----------------------------------------------------------------------------------

def architecture_name(model: torch.nn.Module) -> str:
    """The ``architecture`` a model class declares (``dual_encoder``, ``decoder_lm``, ``vlm``...):
    the name imagefm.json records and the loading layer maps back to the class."""
    name = getattr(type(model), "architecture", None)
    if not isinstance(name, str):
        raise CheckpointError(f"cannot save a {type(model).__name__}: not an imagefm "
                              f"architecture (no 'architecture' class attribute)")
    return name


def save_model(model: torch.nn.Module, directory: str | Path) -> Path:
    """Save a model in imagefm format (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    card = getattr(model, "card", None)
    chat_template = getattr(model, "chat_template", None)
    if chat_template is not None:
        atomic_write_text(directory / CHAT_TEMPLATE_FILE, chat_template)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "imagefm_version": __version__,
        "architecture": architecture_name(model),
        "config": model.config.to_dict(),
        "preprocess": card.__dict__ if card is not None else None,
        "tokenizer": tokenizer.settings() if tokenizer is not None else None,
    }
    # Anything else the model wants recorded (e.g. a quantised LM's layer counts).
    extra = getattr(model, "checkpoint_meta", None)
    if extra is not None:
        meta.update(extra())
    save_state_dict(model.state_dict(), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    card_file = directory / CARD_FILE
    if not card_file.is_file() or "library_name: imagefm" in card_file.read_text(errors="ignore"):
        write_model_card(model, directory)  # never over a README the user wrote
    # The config goes last: a directory with imagefm.json is a complete checkpoint.
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2, ensure_ascii=False))
    return directory


def write_model_card(model: torch.nn.Module, directory: str | Path, **kwargs: Any) -> Path:
    """Write the model card (:func:`imagefm.model_card.model_card`: README.md with the Hub's
    metadata header) to ``directory`` atomically; ``name`` defaults to the directory's name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("name", directory.resolve().name)
    return atomic_write_text(directory / CARD_FILE, model_card(model, **kwargs))


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not an imagefm checkpoint") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: 'format' is {meta.get('format')!r}, expected 'imagefm'")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer imagefm (format "
                              f"{meta['format_version']}); upgrade imagefm to read it")
    return meta
