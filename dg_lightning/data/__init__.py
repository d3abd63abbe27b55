from dg_lightning.data.folder import PACS, ImageFolderDomains
from dg_lightning.data.synthetic import SyntheticShapes

__all__ = ["PACS", "ImageFolderDomains", "SyntheticShapes"]
