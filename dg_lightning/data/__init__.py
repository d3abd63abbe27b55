from dg_lightning.data.domainnet import DomainNet
from dg_lightning.data.folder import PACS, ImageFolderDomains
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

__all__ = ["ACDC", "BDD100K", "GTA5", "PACS", "CamVid", "Cityscapes", "DarkZurich", "DomainNet", "ImageFolderDomains",
           "MapillaryVistas", "SegmentationDG", "SyntheticShapes", "WILDS"]
