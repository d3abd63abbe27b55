from dg_lightning.data.domainbed import VLCS, OfficeHome, TerraIncognita
from dg_lightning.data.domainnet import DomainNet
from dg_lightning.data.folder import PACS, ImageFolderDomains
from dg_lightning.data.mnist import ColoredMNIST, RotatedMNIST
from dg_lightning.data.segmentation import (
    ACDC,
    BDD100K,
    GTA5,
    CamVid,
    Cityscapes,
    DarkZurich,
    MapillaryVistas,
    SegmentationDG,
)
from dg_lightning.data.synthetic import SyntheticShapes
from dg_lightning.data.wilds import WILDS

__all__ = ["ACDC", "BDD100K", "GTA5", "PACS", "VLCS", "CamVid", "Cityscapes", "ColoredMNIST", "DarkZurich", "DomainNet",
           "ImageFolderDomains", "MapillaryVistas", "OfficeHome", "RotatedMNIST", "SegmentationDG", "SyntheticShapes",
           "TerraIncognita", "WILDS"]
