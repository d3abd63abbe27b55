from dg_lightning.methods.ddm import DDM
from dg_lightning.methods.erm import ERM
from dg_lightning.methods.gcisg import GCISG
from dg_lightning.methods.multispace import MultiSpace
from dg_lightning.methods.rise import RISE
from dg_lightning.methods.ssl import SSL

__all__ = ["DDM", "ERM", "GCISG", "RISE", "SSL", "MultiSpace"]
