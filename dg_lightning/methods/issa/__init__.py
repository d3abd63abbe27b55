"""ISSA (Li et al., WACV 2023): intra-source style augmentation by GAN inversion, in three stages,
each saving the checkpoint the next one loads.

1. ``gan.StyleGAN2``: a StyleGAN2 generator (``generator.Generator``: explicit w+ and noise maps)
   trained on the source images (``gan.SourceImages``).
2. ``inversion.NoiseEncoderTraining``: the masked noise encoder (``encoder.MaskedNoiseEncoder``)
   trained against the frozen generator with a multi-scale PatchGAN (``discriminator``).
3. ``mixing.ISSAStyleMixing``: a callback that style-mixes whole source images before the
   segmentation crop, ``G(w_B, noise_A)``, for any segmentation method.

``evaluation``: the measurements of the mechanism (reconstruction, layout kept, style moved).
"""

from dg_lightning.methods.issa.discriminator import MultiScalePatchGAN
from dg_lightning.methods.issa.gan import SourceImages, StyleGAN2
from dg_lightning.methods.issa.generator import Discriminator, Generator
from dg_lightning.methods.issa.inversion import NoiseEncoderTraining, load_inverter
from dg_lightning.methods.issa.mixing import ISSAStyleMixing, style_mix

__all__ = ["Discriminator", "Generator", "ISSAStyleMixing", "MultiScalePatchGAN", "NoiseEncoderTraining",
           "SourceImages", "StyleGAN2", "load_inverter", "style_mix"]
