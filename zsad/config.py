"""Run configuration: an OmegaConf dataclass schema, YAML layers and ``key=value`` overrides.

``compose(layers, overrides)`` builds the resolved config of a run:

1. every YAML layer (paths) and every override is read in order; an override ``group=name`` whose group is one of
   ``method``, ``data``, ``protocol``, ``trainer`` and whose value names a file ``experiments/<group>s/<name>.yaml``
   (``protocol`` → ``experiments/protocols``, ``data`` → ``experiments/data``) loads that file as a layer in place;
2. the method's schema is chosen from ``method.name`` (see ``zsad.registry``);
3. every layer is merged into the typed schema, so an unknown key, a value of the wrong type or an option outside
   its ``Literal[...]`` choices stops with a ``ConfigError`` that names the full key (and the allowed values).

Paper defaults live in one place: the method's dataclass (``experiments/methods/<name>.yaml`` only selects it).

W&B sweeps pass overrides as ``key=value`` (``${args_no_hyphens}``), which is exactly this syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_modules.types import ClassNameSource, MaskResizeRule
from zsad.errors import ConfigError  # noqa: F401 — re-exported: zsad.config.ConfigError is the public name

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
GROUP_DIRS = {"method": "methods", "data": "data", "protocol": "protocols", "trainer": "trainer"}


# Option fields are Literal types: OmegaConf checks them when a layer is merged, so a bad value is a ConfigError at
# compose time that names the key and the allowed values (never a late ValueError inside a model).
OptimName = Literal["adam", "adamw"]
PosInterp = Literal[
    "bilinear", "bicubic"
]  # the backbone keeps the same list (zsad.backbones.clip.POS_INTERP)
MapScoreRule = Literal["max", "mean_topk"]  # zsad.maps.image_score's rules; methods may add their own
LoggerName = Literal["csv", "wandb", "none"]


@dataclass
class OptimConfig:
    """Optimiser and schedule of one training stage."""

    name: OptimName = "adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 0.0
    warmup_frac: float = 0.0  # linear warm-up over this fraction of the stage's steps, then constant


@dataclass
class StageConfig:
    """One training stage: a fixed number of epochs (no model selection on any target set)."""

    epochs: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class BackboneConfig:
    """A frozen encoder: architecture name (``tiny`` = test preset) and weight source."""

    name: str = MISSING
    pretrained: str = "none"  # a known tag (openai, lvd1689m …), a local file path, or none (random weights)


@dataclass
class CLIPBackboneConfig(BackboneConfig):
    """The frozen CLIP of the CLIP-substrate methods, with the two places where code families differ.

    The defaults follow AnomalyCLIP's and MRAD's public code (``specs/clip_substrate.md``); the other values are
    ablations (``experiments/ablations/anomalyclip_pos_bicubic.yaml``, ``…_global_ln_post.yaml``).
    """

    pos_interp: PosInterp = (
        "bilinear"  # bilinear (reference) | bicubic: 24×24 → 37×37 positional-embedding resize
    )
    global_ln_post: bool = False  # False (reference): global embedding x_ori[CLS] @ proj; True: ln_post first


@dataclass
class MethodConfig:
    """Fields every method has. Each method extends it with its own dataclass."""

    name: str = MISSING
    image_size: int = 518
    batch_size: int = 8  # paper default; data.batch_size overrides when set
    smoothing_sigma: float = 4.0
    score_rule: MapScoreRule = "max"  # methods with their own image score (global …) redeclare it
    stages: dict[str, StageConfig] = field(default_factory=dict)


@dataclass
class DatasetRef:
    """A dataset by reader name and root folder (``categories: null`` = all)."""

    name: str = MISSING
    root: str = ""
    categories: list[str] | None = None


@dataclass
class SyntheticConfig:
    """The embedded synthetic benchmark, generated on first use (and again only when an option changes)."""

    root: str = "data/synthetic"
    seed: int = 0
    size: int = 128  # image side in pixels
    n_test: int = 12  # test images per category (about half anomalous)
    n_train: int = 4  # train/good images per category


@dataclass
class DataConfig:
    train: DatasetRef | None = None
    test: list[DatasetRef] = field(default_factory=list)
    batch_size: int | None = None  # null → the method's paper batch size
    test_batch_size: int = 16
    num_workers: int = 0
    pin_memory: bool = True
    persistent_workers: bool = True
    cache_resized: bool = (
        False  # decode + resize every image once into .npy memmaps (fast epochs on big images)
    )
    cache_dir: str = ".cache/resized"
    # The prompts' class name: cleaned (the reader's: "metal nut") | reference_path (AVA-DINO's official
    # image_path.split('/')[-4], raw: "metal_nut", "Data" for every VisA image, "01" for BTAD).
    class_name: ClassNameSource = "cleaned"
    # Mask resize: float (bilinear on 0/1, > 0.5; exact halves → background) | uint8 (the official loaders: bilinear
    # on the 0/255 mode-L image, /255 > 0.5; exact halves → foreground).
    mask_resize: MaskResizeRule = "float"
    synthetic: SyntheticConfig = field(default_factory=lambda: SyntheticConfig())


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # bf16-mixed on GPU
    max_epochs: int | None = None  # null → each stage's own epochs; set → overrides every stage (smoke runs)
    limit_train_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    enable_progress_bar: bool = True
    # true | false | warn (Lightning's values). CUDA's bilinear-upsample backward, which every method's loss
    # runs through, has no deterministic kernel: `true` raises at the first backward on a GPU; `warn` makes
    # everything else deterministic and warns there. Validated by trainer_deterministic().
    deterministic: Any = False


@dataclass
class WandbConfig:
    project: str = "zsad"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    log_gallery: bool = True


@dataclass
class EvalConfig:
    legacy_aupro: bool = True
    gallery_per_category: int = 2


@dataclass
class RunConfig:
    """The whole run. ``method`` is replaced by the method's own schema in ``compose``."""

    method: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = 0
    protocol: str = "custom"  # A | B | synthetic | custom — stated on every leaderboard row
    out_dir: str = "runs"
    variant: str = ""  # ablation / configuration name shown next to the method (experiments/ablations set it)
    run_name: str = ""  # empty → <method>[-<variant>]-<protocol>-s<seed>
    logger: LoggerName = "csv"
    checkpoint: str = ""  # trainable-state checkpoint to test from / resume


def load_yaml(path: Path) -> DictConfig:
    """Read one YAML mapping; a missing or malformed file is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 — yaml errors come in many types
        raise ConfigError(f"cannot parse {path}: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return cfg


def _group_file(key: str, value: str) -> Path | None:
    if key not in GROUP_DIRS or "/" in value:
        return None
    path = EXPERIMENTS / GROUP_DIRS[key] / f"{value}.yaml"
    return path if path.is_file() else None


def _override_layer(item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, _, value = item.partition("=")
    key = key.strip().lstrip("+")
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse override {item!r}: {e}") from e
    return parsed


def read_layers(layers: list[str | Path], overrides: list[str]) -> list[DictConfig]:
    """Turn YAML paths and overrides into an ordered list of untyped layers (group selections expanded)."""
    out: list[DictConfig] = [load_yaml(Path(p)) for p in layers]
    for item in overrides:
        key, _, value = item.partition("=")
        group = _group_file(key.strip(), value.strip())
        out.append(load_yaml(group) if group else _override_layer(item))
    return out


def compose(layers: list[str | Path] = (), overrides: list[str] = ()) -> DictConfig:
    """Build the typed, resolved run config from YAML layers and ``key=value`` overrides.

    Raises:
        ConfigError: a missing file, an unknown key, a wrong type, or a missing method name.
    """
    from zsad.registry import method_schema

    raw = read_layers(list(layers), list(overrides))
    merged = OmegaConf.merge(*raw) if raw else OmegaConf.create()
    name = OmegaConf.select(merged, "method.name", default=None)
    if not name:
        raise ConfigError(
            "method.name is not set: give a method YAML (experiments/methods/*.yaml) or method=NAME"
        )
    schema = OmegaConf.structured(RunConfig(method=method_schema(str(name))()))
    cfg = schema
    for layer in raw:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_explain(e)) from e
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from e
    if missing:
        raise ConfigError(f"required config keys not set: {', '.join(missing)}")
    trainer_deterministic(cfg.trainer.deterministic)  # a wrong value stops here, naming the key
    return cfg


def trainer_deterministic(value: Any) -> bool | str:
    """``trainer.deterministic`` as Lightning takes it: ``True``, ``False`` or ``"warn"``.

    Raises:
        ConfigError: any other value, naming the key.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() == "warn":
        return "warn"
    raise ConfigError(f"trainer.deterministic: expected true, false or warn, got {value!r}")


def _explain(e: OmegaConfBaseException) -> str:
    """One line naming the full key; an option outside its choices reads ``key=value: expected one of a | b``."""
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    choice = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
    if key and choice:
        allowed = " | ".join(a.strip().strip("'") for a in choice.group(2).split(","))
        return f"{key}={choice.group(1)}: expected one of {allowed}"
    return f"config key '{key}': {msg}" if key else msg


def save(cfg: DictConfig, path: Path) -> Path:
    """Write the resolved config as YAML (every run folder holds one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def run_name(cfg: DictConfig) -> str:
    if cfg.run_name:
        return cfg.run_name
    variant = f"-{cfg.variant}" if cfg.variant else ""
    return f"{cfg.method.name}{variant}-{cfg.protocol}-s{cfg.seed}"


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
