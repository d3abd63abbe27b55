"""MixStyle (Zhou et al., ICLR 2021) as a method of its own: ERM with MixStyle after ResNet's layer1-3.

MixStyle is a backbone option of every method (``mixstyle_stages``, ``mixstyle_p``,
``mixstyle_alpha`` on :class:`~dg_lightning.core.method.DGMethod`; the layer is
:mod:`dg_lightning.core.mixstyle`). This class is the row that tables call "MixStyle": ERM with
the official placement and defaults (``resnet18_ms_l123``: after levels 1, 2, 3; p = 0.5, alpha = 0.1).
"""

from __future__ import annotations

from dg_lightning.methods.erm import ERM


class MixStyle(ERM):
    """ERM with MixStyle after ``mixstyle_stages`` (default levels 1, 2, 3 of the backbone)."""

    def __init__(self, mixstyle_stages: list[int] = [1, 2, 3], **kwargs):  # noqa: B006 (jsonargparse needs a literal default)
        if not mixstyle_stages:
            raise ValueError("MixStyle needs at least one stage (mixstyle_stages); for no MixStyle use ERM")
        super().__init__(mixstyle_stages=list(mixstyle_stages), **kwargs)
