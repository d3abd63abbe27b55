from dg_lightning.core.data import MultiDomainDataModule
from dg_lightning.core.method import DGMethod

__all__ = ["DGMethod", "MultiDomainDataModule"]
