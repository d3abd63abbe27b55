"""Segmentation DG: one module per dataset (official layouts), the source -> targets data module."""

from dg_lightning.data.segmentation.acdc import ACDC
from dg_lightning.data.segmentation.base import SegmentationDG, SegmentationSet, train_augmentation
from dg_lightning.data.segmentation.bdd import BDD100K
from dg_lightning.data.segmentation.camvid import CamVid
from dg_lightning.data.segmentation.cityscapes import Cityscapes
from dg_lightning.data.segmentation.darkzurich import DarkZurich
from dg_lightning.data.segmentation.gta5 import GTA5
from dg_lightning.data.segmentation.mapillary import MapillaryVistas

__all__ = ["ACDC", "BDD100K", "GTA5", "CamVid", "Cityscapes", "DarkZurich", "MapillaryVistas", "SegmentationDG",
           "SegmentationSet", "train_augmentation"]
