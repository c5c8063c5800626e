"""Training configuration: one file (YAML or TOML) plus ``key=value`` overrides, validated once.

    cfg = load_config("runs.yaml", ["train.steps=300", "model.preset=tiny", "run.local=true"])

Sections: ``run`` (where, seed, checkpoints, logging), ``model``, ``task``, ``data``, ``optim``,
``train`` (the loop), ``stage`` (which parameters train at which learning rate) and ``eval``
(evaluation during training: held-out loss, evaluators, best model, early stopping).
Every key, type and value is checked before anything starts: a typo, a string where a number
belongs or an impossible value raises ``ConfigError`` naming the key and what to write instead.

``run.local=true`` shrinks any config to a laptop-sized smoke run (tiny model, a few steps,
small batches), in the spirit of big_vision's ``runlocal``; overrides on the command line still
win over what the shrink chose.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagefm.config import ConfigError, check_choice
from imagefm.train.local import shrink_for_local
from imagefm.train.presets import MODEL_PRESETS

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
PRECISIONS = ("auto", "bf16", "fp32")
OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach")
HOST_SYNCS = ("auto", "step", "log")
STRATEGIES = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
LOSSES = ("auto", "clip", "siglip")
TASKS = ("contrastive", "vlm", "ulip", "asr_ctc")
WANDB_MODES = ("off", "offline", "online")
EVAL_MODES = ("auto", "min", "max")


@dataclass
class RunConfig:
    """Where the run lives and how often it saves."""

    name: str = "run"
    output_dir: str = "runs"  # the run folder is output_dir/name
    seed: int = 0
    local: bool = False  # shrink to a laptop-sized smoke run
    resume: bool = False  # continue from the newest checkpoint in the run folder
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 1000  # steps between run checkpoints (one is always written at the end)
    keep_last: int = 3  # run checkpoints kept on disk
    log_every: int = 1  # steps between metric lines
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True  # also write TensorBoard events when `tensorboard` is installed
    wandb: str = "off"  # off | offline | online: also log to Weights & Biases
    wandb_project: str = "imagefm"


@dataclass
class ModelConfig:
    """The model to train: a preset (with overrides) or an existing checkpoint."""

    preset: str = "tiny"
    init: str | None = None  # a checkpoint directory to start from instead of random weights
    config: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {vision: {layers: 2}}
    # Image card fields to replace, e.g. {resize_mode: pad} (imagefm.config.ImageCard).
    preprocess: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    # Start the preset's towers from the pretrained weights it names, where it names any
    # (imagefm.convert.towers.PRESET_TOWERS; lit-effnet: EfficientNet-Lite0 +
    # multilingual-e5-small).
    pretrained: bool = True


@dataclass
class TaskConfig:
    """What is optimised. ``loss = auto`` follows the model's ``model_type``."""

    # contrastive (dual encoders) | vlm (next-token loss on replies) | ulip (point cloud–text
    # models: point ↔ text + image_weight × point ↔ rendered image, train/points.py)
    name: str = "contrastive"
    loss: str = "auto"  # auto | clip | siglip
    max_logit_scale: float = 100.0  # logit_scale is clamped to log(this) after every step
    gather_with_grad: bool = True  # clip under DDP: exact global-batch gradients
    local_loss: bool = True  # clip under DDP: O(local x global) memory
    image_weight: float = 1.0  # ulip: weight of the point ↔ image term (0: point ↔ text only)


@dataclass
class DataConfig:
    """Where batches come from. ``source`` names a registered data source (see train/data.py)."""

    source: str = "toy"  # toy (built-in random pairs) | a registered name | "module:function"
    path: str | None = None
    batch_size: int = 32  # the GLOBAL batch of one optimizer step: split over ranks and
    # train.accumulate micro-batches (train/data.py micro_batch_size)
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # passed on to the data source


@dataclass
class OptimConfig:
    """AdamW, a cosine schedule with linear warmup, gradient clipping."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # AdamW's kernel: fused (one kernel for the whole step, 3.5-5x faster than foreach on the
    # CPU), foreach, or auto: fused unless a parameter is sharded (FSDP).
    implementation: str = "auto"


@dataclass
class LoopConfig:
    """The training loop itself."""

    steps: int = 1000  # optimizer steps
    # Micro-batches per optimizer step (gradient accumulation): each rank sees data.batch_size
    # / (world size * accumulate) rows at a time; the step equals one on the whole batch.
    accumulate: int = 1
    precision: str = "auto"  # auto (bf16 autocast where supported) | bf16 | fp32
    gradcache_chunk: int = 0  # > 0: GradCache with chunks of this many rows per rank
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights
    max_bad_steps: int = 20  # this many non-finite losses in a row stop the run
    strategy: str = "ddp"  # ddp | fsdp (with more than one rank)
    # When the loss and gradient norm are read back to the host: every step (step), or only
    # every run.log_every steps (log: a GPU never waits for Python between steps; a
    # non-finite step is still skipped, on the device, and counted at the next log line).
    # auto: log on CUDA with the fused AdamW, step elsewhere.
    host_sync: str = "auto"


@dataclass
class StageConfig:
    """What trains at which learning rate, as data.

    Prefixes are parameter-name prefixes on module boundaries (``vision`` matches
    ``vision.pos_embed`` but not ``vision_proj``). ``preset`` adds its own frozen prefixes:
    ``full`` trains everything; ``lit`` locks the image tower (LiT); for a VLM, ``align``
    trains the projector only (vision tower and LM frozen), ``sft`` the projector and the LM,
    and ``lora`` the LoRA adapters only (``lora_rank`` > 0; everything else frozen).
    """

    preset: str = "full"
    frozen: list[str] = field(default_factory=list)
    lr_mult: dict[str, float] = field(default_factory=dict)  # longest matching prefix wins
    unlock_last_n: dict[str, int] = field(default_factory=dict)  # {"vision": 2}: thaw 2 blocks
    # LoRA (through peft) on the named linear layers under `lora_modules`; those modules' own
    # weights are then frozen, and the update is merged back into them in the exported model.
    lora_rank: int = 0  # 0 = no LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                             "o_proj"])
    lora_modules: list[str] = field(default_factory=lambda: ["lm"])
    # WiSE-FT: export (1 - a) * starting weights + a * trained weights (train/wise.py); the
    # trained model keeps more of what the starting one knew. None = the trained weights.
    wise_alpha: float | None = None


@dataclass
class EvalConfig:
    """Evaluation during training (train/evaluation.py): every ``every`` steps and at the end.

    ``data`` is held-out data for ``eval/loss`` (read by ``source``, default data.source); the
    evaluators ``imagefm train`` adds (zero-shot, retrieval...) report other ``eval/*`` metrics.
    ``metric`` picks the one the best model (``<run>/best/``) and early stopping follow.
    """

    every: int = 0  # steps between evaluations; 0 = off
    data: str | None = None  # held-out data (a path / URL spec the data source understands)
    source: str | None = None  # the data source of the held-out batches; None = data.source
    batch_size: int | None = None  # None = data.batch_size
    limit: int = 1000  # held-out samples per evaluation (whole batches, at least one)
    langs: list[str] = field(default_factory=list)  # caption languages to evaluate; [] = all
    metric: str = "eval/loss"  # what "best" and early stopping follow
    mode: str = "auto"  # min | max | auto (min for names ending in "loss", else max)
    patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    keep_best: bool = True  # export the best model to <run>/best/


@dataclass
class TrainConfig:
    """A whole training run. Build it with ``load_config`` or ``TrainConfig.from_dict``."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# Frozen parts per preset. For a VLM, "vision", "projector" and "lm" name its parts whatever its
# family calls them (train/stages.py: Qwen2-VL's projector is the merger inside its tower).
STAGE_PRESETS: dict[str, list[str]] = {"full": [], "lit": ["vision"], "align": ["vision", "lm"],
                                        "sft": ["vision"], "lora": ["vision", "projector", "lm"]}


# --- loading -------------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                ) -> TrainConfig:
    """Read a YAML/TOML file (or start from defaults), apply ``a.b=value`` overrides, validate.

    Values in overrides are parsed as YAML scalars/lists (``3``, ``1e-4``, ``true``, ``[a, b]``).
    """
    data = read_config_file(path) if path is not None else {}
    parsed = [parse_override(o) for o in overrides]
    for key, value in parsed:
        set_dotted(data, key, value)
    config = TrainConfig.from_dict(data)
    if config.run.local:
        data = shrink_for_local(config.to_dict())
        for key, value in parsed:  # explicit overrides still win over the shrink
            set_dotted(data, key, value)
        config = TrainConfig.from_dict(data)
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a ``.yaml``/``.yml``/``.toml`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = _toml_loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path} cannot be parsed: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=300"`` -> ``("train.steps", 300)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value "
                          f"(e.g. train.steps=300)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: take the text as it is
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for key ``a.b.c``, creating mappings on the way."""
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parents[:i + 1])} is a value, "
                              f"not a section")
        node = child
    node[last] = value


# --- building and validating ---------------------------------------------------------------------

def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    label = where or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) in {label}: {', '.join(unknown)}; "
                          f"known keys are: {', '.join(names)}")
    values = {}
    for name in names:
        if name not in data:
            continue
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(data[name], hints[name], key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against type ``hint`` (ints may stand for floats); return it."""
    if key == "run.wandb" and isinstance(value, bool):  # YAML 1.1 reads a bare off/on as bools
        if value:
            raise ConfigError("run.wandb must be off, offline or online, got true")
        return "off"
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r} (write e.g. {key}=[a, b])")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `run.name=2024` reads as a number; a name is what was meant
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def _at_least(minimum: float, **values: float) -> None:
    for key, value in values.items():
        if value < minimum:
            raise ConfigError(f"{key.replace('__', '.')} must be >= {minimum}, got {value}")


def validate(c: TrainConfig) -> None:
    """Values that are the right type but impossible. Model-dependent checks happen later."""
    from imagefm.config import PRESETS

    known = sorted({**PRESETS, **MODEL_PRESETS})
    if c.model.init is None and c.model.preset not in known:
        raise ConfigError(f"model.preset = {c.model.preset!r} is unknown; choose one of "
                          f"{', '.join(known)} (or set model.init to a checkpoint)")
    check_choice("run.device", c.run.device, DEVICES)
    check_choice("task.name", c.task.name, TASKS)
    check_choice("task.loss", c.task.loss, LOSSES)
    check_choice("train.precision", c.train.precision, PRECISIONS)
    check_choice("optim.implementation", c.optim.implementation, OPTIMIZER_IMPLEMENTATIONS)
    check_choice("train.host_sync", c.train.host_sync, HOST_SYNCS)
    if c.train.host_sync == "log" and c.optim.implementation == "foreach":
        raise ConfigError("train.host_sync=log skips non-finite steps inside the fused AdamW: "
                          "set optim.implementation to auto or fused, or train.host_sync to step")
    check_choice("train.strategy", c.train.strategy, STRATEGIES)
    check_choice("run.wandb", c.run.wandb, WANDB_MODES)
    if not c.run.wandb_project.strip():
        raise ConfigError("run.wandb_project must not be empty (e.g. run.wandb_project=imagefm)")
    check_choice("stage.preset", c.stage.preset, tuple(STAGE_PRESETS))
    _at_least(1, run__checkpoint_every=c.run.checkpoint_every, run__keep_last=c.run.keep_last,
              run__log_every=c.run.log_every, train__steps=c.train.steps,
              data__batch_size=c.data.batch_size, train__max_bad_steps=c.train.max_bad_steps)
    _at_least(0, optim__weight_decay=c.optim.weight_decay, optim__warmup_steps=c.optim.warmup_steps,
              optim__grad_clip=c.optim.grad_clip, train__gradcache_chunk=c.train.gradcache_chunk,
              data__num_workers=c.data.num_workers, run__seed=c.run.seed)
    if c.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {c.optim.lr}")
    if len(c.optim.betas) != 2 or not all(0 <= b < 1 for b in c.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {c.optim.betas}")
    if not 0 <= c.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {c.optim.min_lr_ratio}")
    if not 0 <= c.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 turns EMA off), "
                          f"got {c.train.ema_decay}")
    if c.task.max_logit_scale <= 1:
        raise ConfigError(f"task.max_logit_scale must be > 1, got {c.task.max_logit_scale}")
    if c.task.name == "vlm" and c.model.init is None:
        raise ConfigError("task.name = vlm trains an existing VLM: set model.init to its "
                          "checkpoint (make one with `imagefm vlm init --vision M --lm LM`)")
    if c.task.name == "vlm" and c.train.gradcache_chunk:
        raise ConfigError("train.gradcache_chunk is for contrastive batches; the vlm task's "
                          "loss is per example: set train.gradcache_chunk=0")
    if c.train.gradcache_chunk and c.train.strategy == "fsdp":
        raise ConfigError("train.gradcache_chunk needs train.strategy=ddp: GradCache re-runs the "
                          "model chunk by chunk, which FSDP's sharded parameters do not support")
    for prefix, n in c.stage.unlock_last_n.items():
        if n < 0:
            raise ConfigError(f"stage.unlock_last_n.{prefix} must be >= 0, got {n}")
    if c.stage.lora_rank < 0 or (c.stage.lora_rank and (c.stage.lora_alpha <= 0 or
                                                        not c.stage.lora_targets)):
        raise ConfigError("stage.lora_rank must be >= 0, with lora_alpha > 0 and at least one "
                          "name in stage.lora_targets")
    if c.stage.preset == "lora" and not c.stage.lora_rank:
        raise ConfigError("stage.preset = lora trains LoRA adapters only: set stage.lora_rank "
                          "(e.g. 8)")
    if c.stage.wise_alpha is not None:
        if not 0 <= c.stage.wise_alpha <= 1:
            raise ConfigError(f"stage.wise_alpha must be in [0, 1] (1 = the trained weights), "
                              f"got {c.stage.wise_alpha}")
        if c.stage.lora_rank or c.train.ema_decay or c.train.strategy == "fsdp":
            raise ConfigError("stage.wise_alpha interpolates plain weights: not with "
                              "stage.lora_rank, train.ema_decay or train.strategy=fsdp")
    if c.stage.lora_rank and c.train.ema_decay:
        raise ConfigError("train.ema_decay is not supported with stage.lora_rank: the average "
                          "would mix LoRA tensors that are merged away at export")
    for prefix, mult in c.stage.lr_mult.items():
        if mult < 0:
            raise ConfigError(f"stage.lr_mult.{prefix} must be >= 0, got {mult}")
    _validate_accumulation(c)
    _validate_eval(c)


def _validate_accumulation(c: TrainConfig) -> None:
    _at_least(1, train__accumulate=c.train.accumulate)
    if c.data.batch_size % c.train.accumulate:
        raise ConfigError(f"data.batch_size ({c.data.batch_size}) must be divisible by "
                          f"train.accumulate ({c.train.accumulate}): it is the batch of one "
                          f"optimizer step, made of train.accumulate micro-batches")
    if c.train.accumulate > 1 and c.task.name == "contrastive" and c.train.strategy == "fsdp":
        raise ConfigError("train.accumulate > 1 trains contrastive batches with GradCache, which "
                          "needs train.strategy=ddp (FSDP's sharded parameters cannot re-run "
                          "chunk by chunk)")


def _validate_eval(c: TrainConfig) -> None:
    e = c.eval
    _at_least(0, eval__every=e.every, eval__patience=e.patience)
    _at_least(1, eval__limit=e.limit)
    if e.batch_size is not None:
        _at_least(1, eval__batch_size=e.batch_size)
    check_choice("eval.mode", e.mode, EVAL_MODES)
    if not e.metric.startswith("eval/") or e.metric == "eval/":
        raise ConfigError(f"eval.metric must name an evaluation metric, which start with "
                          f"'eval/' (e.g. eval/loss), got {e.metric!r}")
    if e.patience and not e.every:
        raise ConfigError("eval.patience stops the run after evaluations without improvement, "
                          "but eval.every = 0 (no evaluations): set eval.every")
    if e.data is not None and not e.data.strip():
        raise ConfigError("eval.data is empty: give the held-out data's path, or leave it out")
