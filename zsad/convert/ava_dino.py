"""Official AVA-DINO checkpoints (aqeeelmirza/AVA-DINO) ↔ zsad's AVA-DINO trainable state.

The official ``train.py`` saves one ``epoch_N.pth`` per epoch: a dict with ``epoch`` (int) and the ``state_dict()``
of six sub-modules of ``CLIP.adapter.AVADino(c_in=1024)``, each under its attribute name; ``test.py`` loads them back
one by one. Flattened (``<module>.<key>``) they are ``AVADino.state_dict()``. The mapping, written out (tap index
t = 0 … 3 is the official list index, i.e. DINOv3 blocks 6/12/18/24, zsad's ``method.taps`` in that order):

===================================================== =========== =============================================
official                                              shape       zsad (``AvaDino`` trainable state)
===================================================== =========== =============================================
``patch_token_adapter_normal.{t}.fc1.0.weight``        [768, 1024] ``heads.patch_adapters.{t}.0.down.weight``
``patch_token_adapter_normal.{t}.fc2.0.weight``        [1024, 768] ``heads.patch_adapters.{t}.0.up.weight``
``patch_token_adapter_anomaly.{t}.fc{1,2}.0.weight``               ``heads.patch_adapters.{t}.1.{down,up}.weight``
``cls_token_adapter_normal.{t}.fc{1,2}.0.weight``                  ``heads.cls_adapters.{t}.0.{down,up}.weight``
``cls_token_adapter_anomaly.{t}.fc{1,2}.0.weight``                 ``heads.cls_adapters.{t}.1.{down,up}.weight``
``prompt_adapter.{j}.fc1.0.weight`` (j = 0 normal, 1)  [768, 768]  ``heads.prompt_adapters.{j}.down.weight``
``prompt_adapter.{j}.fc2.0.weight``                    [768, 768]  dropped: the official forward uses only the
                                                                   hidden (``[0]``), zsad does not build fc2
``text_projection.weight``                             [1024, 768] ``heads.text_proj.weight``
===================================================== =========== =============================================

The official model was trained with the reference behaviours of ``experiments/ablations/ava_dino_faithful.yaml``
(GELU text tower, interleaved prototypes, class name from the path): ``zsad convert`` composes that layer by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zsad.convert import CONVERTERS, ConversionError, check_keys, method_node

METHOD = next(name for name, module in CONVERTERS.items() if module == __name__)  # the registry's entry
N_TAPS = 4  # AVADino builds four adapters per branch, for DINOv3 blocks 6, 12, 18, 24 (1-based)
OFFICIAL_TAPS = [6, 12, 18, 24]
MODULES = (  # train.py's wrapper keys, each holding one sub-module's state_dict()
    "cls_token_adapter_normal",
    "cls_token_adapter_anomaly",
    "patch_token_adapter_normal",
    "patch_token_adapter_anomaly",
    "prompt_adapter",
    "text_projection",
)
WRAPPER_EXTRA = ("epoch",)
# Official tensors that zsad has no use for (never read by the official forward either; no gradient).
DROPPED = tuple(f"prompt_adapter.{j}.fc2.0.weight" for j in (0, 1))


def name_map() -> dict[str, str]:
    """Official name → zsad trainable name, every entry written out (see the module docstring)."""
    out = {"text_projection.weight": "heads.text_proj.weight"}
    for t in range(N_TAPS):
        for branch, b in (("normal", 0), ("anomaly", 1)):
            for kind, zsad_list in (("patch", "patch_adapters"), ("cls", "cls_adapters")):
                for fc, linear in (("fc1", "down"), ("fc2", "up")):
                    out[f"{kind}_token_adapter_{branch}.{t}.{fc}.0.weight"] = (
                        f"heads.{zsad_list}.{t}.{b}.{linear}.weight"
                    )
    for j in (0, 1):
        out[f"prompt_adapter.{j}.fc1.0.weight"] = f"heads.prompt_adapters.{j}.down.weight"
    return out


def _check_config(cfg: Any) -> None:  # noqa: ANN401 - run config or method node
    """The zsad configuration must have the official model's structure; name the key that does not."""
    m = method_node(cfg)
    if str(m.name) != METHOD:
        raise ConversionError(f"method.name: an AVA-DINO checkpoint needs method {METHOD}, not {m.name!r}")
    wrong = {
        "method.taps": (list(m.taps), OFFICIAL_TAPS),
        "method.shared_adapters": (bool(m.shared_adapters), False),
        "method.cls_adapt": (bool(m.cls_adapt), True),
        "method.learn_tau": (bool(m.learn_tau), False),
        "method.routing": (str(m.routing), "text"),
    }
    for key, (have, want) in wrong.items():
        if have != want:
            raise ConversionError(
                f"{key}={have}: the official AVA-DINO model has {key.split('.')[1]}={want}; set {key}={want}"
            )


def read_official(path: str | Path) -> dict[str, Tensor]:
    """The official trainables, flattened to ``AVADino.state_dict()`` names.

    Accepts ``train.py``'s ``epoch_N.pth`` wrapper (``epoch`` + six sub-module state dicts) or a flat
    ``AVADino.state_dict()`` file. Anything else in the wrapper is a :class:`ConversionError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"official AVA-DINO checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise ConversionError(f"cannot read {path} as a torch checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict (train.py's epoch_N.pth), got {type(obj).__name__}")
    if any(k in obj for k in MODULES):
        unknown = sorted(k for k in obj if k not in MODULES and k not in WRAPPER_EXTRA)
        missing = [k for k in MODULES if k not in obj]
        if unknown or missing:
            raise ConversionError(f"{path}: wrapper keys missing {missing}, unknown {unknown}")
        flat = {}
        for module in MODULES:
            if not isinstance(obj[module], dict):
                raise ConversionError(f"{path}: {module} is not a state dict")
            flat.update({f"{module}.{k}": v for k, v in obj[module].items()})
        obj = flat
    bad = sorted(k for k, v in obj.items() if not torch.is_tensor(v))
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {bad}")
    return dict(obj)


def to_zsad(official: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:  # noqa: ANN401
    """Official names → zsad ``AvaDino.trainable_state_dict()`` names (float32 copies).

    Raises:
        ConversionError: a missing or unknown key (named), a shape that contradicts ``method.hidden``, or a
            configuration whose structure differs from the official model (named key).
    """
    _check_config(cfg)
    mapping = name_map()
    check_keys(official, list(mapping), lambda k: k in DROPPED, "official AVA-DINO checkpoint")
    hidden = int(method_node(cfg).hidden)
    for t in range(N_TAPS):
        width = official[f"patch_token_adapter_normal.{t}.fc1.0.weight"].shape[0]
        if width != hidden:
            raise ConversionError(
                f"method.hidden={hidden}, but the official adapters have a {width}-wide bottleneck "
                f"(patch_token_adapter_normal.{t}.fc1.0.weight); set method.hidden={width}"
            )
    return {z: official[o].detach().to(torch.float32).clone() for o, z in mapping.items()}


def to_official(
    zsad_state: dict[str, Tensor],
    cfg: Any,  # noqa: ANN401
    unused: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """zsad trainable state → a flat official ``AVADino.state_dict()`` (``AVADino.load_state_dict(strict=True)``).

    zsad does not build the prompt adapters' fc2, so it cannot be recovered: ``prompt_adapter.{j}.fc2.0.weight``
    is taken from ``unused`` when given (an official dict: exact round trips) and is **zeros** otherwise. The
    official forward never reads fc2 (only the hidden ``[0]`` of the prompt adapters), so either choice gives the
    same outputs and gradients; only the file's bytes differ.

    Args:
        zsad_state: ``AvaDino.trainable_state_dict()`` (names with ``heads.``).
        cfg: the run config or its method node.
        unused: where to take the fc2 tensors from, if anywhere.

    Raises:
        ConversionError: a missing or unknown zsad key (named), or a structure the official model does not have.
    """
    _check_config(cfg)
    inverse = {z: o for o, z in name_map().items()}
    check_keys(zsad_state, list(inverse), lambda k: False, "zsad AVA-DINO trainable state")
    out = {o: zsad_state[z].detach().clone() for z, o in inverse.items()}
    for key in DROPPED:
        fc1 = out[key.replace("fc2", "fc1")]
        if unused is not None and key in unused:
            out[key] = unused[key].detach().clone()
        else:
            out[key] = fc1.new_zeros(fc1.shape[::-1])
    return dict(sorted(out.items()))


def official_checkpoint(flat: dict[str, Tensor], epoch: int = 0) -> dict[str, Any]:
    """A flat official state dict in ``train.py``'s ``epoch_N.pth`` layout (what ``test.py`` loads)."""
    out: dict[str, Any] = {"epoch": int(epoch)}
    for module in MODULES:
        prefix = f"{module}."
        out[module] = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    rest = sorted(k for k in flat if not k.startswith(tuple(f"{m}." for m in MODULES)))
    if rest:
        raise ConversionError(f"keys outside the official sub-modules: {rest}")
    return out


__all__ = ["DROPPED", "name_map", "official_checkpoint", "read_official", "to_official", "to_zsad"]
