from dg_lightning.methods.erm import ERM
from dg_lightning.methods.gcisg import GCISG
from dg_lightning.methods.rise import RISE

__all__ = ["ERM", "GCISG", "RISE"]
