"""DomainBed's MNIST CNN as a timm model: ``model.backbone: domainbed_mnist_cnn``.

Follows ``MNIST_CNN`` in DomainBed's ``domainbed/networks.py`` (Gulrajani & Lopez-Paz 2021), the
featuriser of ColoredMNIST and RotatedMNIST: four 3x3 convolutions (64, 128 with stride 2, 128,
128 channels), each followed by ReLU and then GroupNorm with 8 groups (in that order: activation
before normalisation, as in the official code), and a global mean pool to 128 features. No dropout
(DomainBed's ``resnet_dropout`` applies to its ResNets only) and no input normalisation: the
pixels reach the first convolution in [0, 1], as in DomainBed. The classifier (a linear layer on the
128 features) is the method base's head.

Registered with timm's ``register_model`` so a YAML names it like any timm backbone; the input
channels come from ``in_chans`` (``model.backbone_args: {in_chans: 2}`` for ColoredMNIST, 1 for
RotatedMNIST, the default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from dg_lightning.core.errors import ConfigError


class DomainBedMNISTCNN(nn.Module):
    """Conv(64) -> Conv(128, stride 2) -> Conv(128) -> Conv(128), each ReLU then GroupNorm(8); mean pool.

    ``forward`` returns pooled features (timm's headless convention, ``num_classes=0``); a positive
    ``num_classes`` adds a linear classifier, as timm models do.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 0, **_: object):
        super().__init__()
        widths = (64, 128, 128, 128)
        strides = (1, 2, 1, 1)
        convs, norms, prev = [], [], in_chans
        for width, stride in zip(widths, strides):
            convs.append(nn.Conv2d(prev, width, 3, stride=stride, padding=1))
            norms.append(nn.GroupNorm(8, width))
            prev = width
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.num_features = widths[-1]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        # the method base normalises with the backbone's (mean, std): none here, as in DomainBed
        self.pretrained_cfg = {"mean": (0.0,), "std": (1.0,), "input_size": (in_chans, 28, 28),
                               "architecture": "domainbed_mnist_cnn"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = norm(F.relu(conv(x)))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def domainbed_mnist_cnn(pretrained: bool = False, **kwargs) -> DomainBedMNISTCNN:
    """DomainBed's MNIST CNN (random initialisation only: there are no pretrained weights)."""
    if pretrained:
        raise ConfigError("domainbed_mnist_cnn has no pretrained weights (DomainBed trains it from scratch): "
                          "set model.pretrained: false")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return DomainBedMNISTCNN(**kwargs)
