"""ISSA (Li et al., WACV 2023): intra-source style augmentation by GAN inversion, in three stages.

1. ``gan.StyleGAN2``: a StyleGAN2 generator (``generator.Generator``: explicit w+ and noise maps)
   trained on the source images.
2. The masked noise encoder (generator frozen).  *(not yet written)*
3. Style mixing ``G(w_B, noise_A)`` in segmentation training.  *(not yet written)*
"""

from dg_lightning.methods.issa.gan import SourceImages, StyleGAN2
from dg_lightning.methods.issa.generator import Discriminator, Generator

__all__ = ["Discriminator", "Generator", "SourceImages", "StyleGAN2"]
