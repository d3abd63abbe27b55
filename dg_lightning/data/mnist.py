"""ColoredMNIST and RotatedMNIST, built as DomainBed builds them, from torchvision's MNIST folder.

Follows ``MultipleEnvironmentMNIST``, ``ColoredMNIST`` and ``RotatedMNIST`` in DomainBed's
``domainbed/datasets.py`` (Gulrajani & Lopez-Paz 2021):

* all 70,000 MNIST digits (the training and test sets, in that order) are shuffled with
  ``torch.randperm`` and dealt to the environments in turn (environment ``i`` takes every ``k``-th
  image from position ``i``);
* **ColoredMNIST** (environments ``+90%``, ``+80%``, ``-90%``): label ``1`` if the digit is below 5, flipped
  with probability 0.25; a colour equal to the label, flipped with probability 0.1, 0.2, 0.9 (so colour
  and label agree in about 90 %, 80 % and 10 % of the images); the image is 2 x 28 x 28 with the digit in
  channel ``colour`` and zeros in the other; pixels / 255;
* **RotatedMNIST** (environments ``0``, ``15``, ..., ``75``): the digit rotated by that many degrees
  (PIL, bicubic, filled with 0), 1 x 28 x 28, pixels / 255, the digit as the label (10 classes).

All randomness comes from one ``torch`` generator seeded with ``shuffle_seed``, drawn in DomainBed's
order (the permutation, then per environment the label noise and the colour flips). DomainBed seeds
it with its run seed (``torch.manual_seed(args.seed)`` just before building the dataset), so
``shuffle_seed: null`` (the default) uses the run's seed: with the run seed DomainBed would use
(``dg-lightning sweep`` passes it) the environments are DomainBed's, image for image. No augmentation
(DomainBed has none for these); the in/out split is DomainBed's (:class:`DomainBedSplit`), and the
held-out environment is tested on its "in" split.

Reads ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` through
``torchvision.datasets.MNIST`` (get it with ``dg-lightning download mnist --root DIR``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dg_lightning.core.data import MultiDomainDataModule, run_seed
from dg_lightning.core.errors import ConfigError
from dg_lightning.data.domainbed import DomainBedSplit
from dg_lightning.data.segmentation.base import expand_root

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_mnist(root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), digits int64 (N,)): MNIST's training set, then its test set."""
    from torchvision.datasets import MNIST

    parts = [MNIST(str(root), train=train, download=False) for train in (True, False)]
    return torch.cat([p.data for p in parts]), torch.cat([p.targets for p in parts]).long()


def download_mnist(root: str | Path) -> Path:
    """torchvision's MNIST download (its mirrors, its md5 of each archive) into ``<root>/MNIST/raw``."""
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(str(root), train=train, download=True)
    return Path(root)


class DomainBedMNIST(DomainBedSplit, MultiDomainDataModule):
    """Base of ColoredMNIST and RotatedMNIST: reads MNIST, shuffles, deals to ``ENVIRONMENTS``.

    Args:
        root: torchvision's MNIST folder (the one holding ``MNIST/raw``; ``$VAR`` and ``${VAR:-default}`` expanded).
        shuffle_seed: seed of the environments' construction; ``None``: the run's seed (DomainBed).
        test_split: ``in`` (DomainBed: the held-out environment's 80 % "in" split) or ``full``.
        augment: ``none`` only (DomainBed does not augment these); ``train_transform`` /
            ``eval_transform``, if given, receive the image tensors.
        image_size: 28 only (or unset).
        (everything else: see :class:`~dg_lightning.core.data.MultiDomainDataModule`)
    """

    default_image_size = 28
    layout_hint = "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision's MNIST folder)"
    download_hint = "dg-lightning download mnist --root DIR  (torchvision's MNIST download, md5-checked)"
    CLASSES: tuple[str, ...] = ()

    def __init__(self, root: str | None = None, shuffle_seed: int | None = None, test_split: str = "in",
                 augment: str = "none", image_size: int | None = None, **kwargs):
        name = type(self).__name__
        if root is None:
            raise ConfigError(f"{name} needs data.root: a folder laid out as {self.layout_hint}. "
                             f"To get the data: {self.download_hint}")
        if augment != "none":
            raise ConfigError(f"{name} is not augmented (DomainBed does not augment it): leave data.augment at none, "
                             "or give your own data.train_transform (it receives the image tensor)")
        if image_size not in (None, 28):
            raise ConfigError(f"{name}'s images are 28 x 28 (DomainBed's): data.image_size {image_size} cannot apply; "
                             "resize in your own data.train_transform / data.eval_transform")
        if kwargs.get("batch_augment") or kwargs.get("cache_images"):
            raise ConfigError(f"{name} is built in memory as tensors and not augmented: data.batch_augment and "
                             "data.cache_images do not apply")
        self.root, self.shuffle_seed = expand_root(root), shuffle_seed
        train_transform, eval_transform = kwargs.pop("train_transform", None), kwargs.pop("eval_transform", None)
        super().__init__(test_split=test_split, augment="none", image_size=28, **kwargs)
        # the images are built as tensors in [0, 1]; only a transform the user gives is applied
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self._env_data: dict[str, dict[str, torch.Tensor]] | None = None

    def _discover(self) -> tuple[list[str], list[str]]:
        for name in RAW_FILES:
            path = self.root / "MNIST" / "raw" / name
            if not path.is_file():
                raise self._missing(path)
        return list(self.ENVIRONMENTS), list(self.CLASSES)

    def environments(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each environment's tensors (built once): ``digit`` (the MNIST digit), ``label``, and the
        subclass's own (``image`` uint8, ``colour``)."""
        if self._env_data is None:
            images, digits = read_mnist(self.root)
            generator = torch.Generator().manual_seed(int(run_seed(self.shuffle_seed)))
            order = torch.randperm(len(images), generator=generator)
            images, digits = images[order], digits[order]
            k = len(self.ENVIRONMENTS)
            self._env_data = {
                env: self._make_environment(i, images[i::k], digits[i::k], generator)
                for i, env in enumerate(self.ENVIRONMENTS)
            }
        return self._env_data

    def _make_environment(self, index: int, images: torch.Tensor, digits: torch.Tensor,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _samples(self, domain: str) -> tuple[list[tuple[str, int]], list[int]]:
        env = self.environments()[domain]
        n = len(env["label"])
        return [(domain, i) for i in range(n)], env["label"].tolist()


class ColoredMNIST(DomainBedMNIST):
    """DomainBed's ColoredMNIST (Arjovsky et al. 2019): binary label, colour spuriously correlated with it
    at 90 % / 80 % / 10 % in environments ``+90%``, ``+80%``, ``-90%``; 2 x 28 x 28 inputs."""

    ENVIRONMENTS = ("+90%", "+80%", "-90%")
    #: probability of flipping the colour away from the label, per environment
    COLOUR_FLIP = (0.1, 0.2, 0.9)
    LABEL_NOISE = 0.25
    #: label 0: digit 5-9, label 1: digit 0-4 (before the label noise)
    CLASSES = ("5-9", "0-4")

    def _make_environment(self, index, images, digits, generator):
        def bernoulli(p: float, n: int) -> torch.Tensor:
            return (torch.rand(n, generator=generator) < p).long()

        n = len(digits)
        label = (digits < 5).long() ^ bernoulli(self.LABEL_NOISE, n)
        colour = label ^ bernoulli(self.COLOUR_FLIP[index], n)
        return {"image": images, "digit": digits, "label": label, "colour": colour}

    def _load(self, item: tuple[str, int]) -> torch.Tensor:
        domain, i = item
        env = self.environments()[domain]
        x = torch.zeros(2, 28, 28)
        x[int(env["colour"][i])] = env["image"][i].float() / 255.0
        return x


class RotatedMNIST(DomainBedMNIST):
    """DomainBed's RotatedMNIST (Ghifary et al. 2015): the digit rotated by 0, 15, 30, 45, 60 or 75 degrees;
    1 x 28 x 28 inputs, 10 classes."""

    ENVIRONMENTS = ("0", "15", "30", "45", "60", "75")
    CLASSES = tuple(str(d) for d in range(10))

    def _make_environment(self, index, images, digits, generator):
        angle = float(self.ENVIRONMENTS[index])
        rotated = np.stack([
            np.asarray(Image.fromarray(img).rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=0))
            for img in images.numpy()
        ]) if len(images) else np.zeros((0, 28, 28), dtype=np.uint8)
        return {"image": torch.from_numpy(rotated), "digit": digits, "label": digits.clone()}

    def _load(self, item: tuple[str, int]) -> torch.Tensor:
        domain, i = item
        return self.environments()[domain]["image"][i].float().div(255.0).unsqueeze(0)
