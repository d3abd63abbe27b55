from dg_lightning.methods.coral import CORAL
from dg_lightning.methods.dann import DANN
from dg_lightning.methods.ddm import DDM
from dg_lightning.methods.erm import ERM
from dg_lightning.methods.fish import Fish
from dg_lightning.methods.gcisg import GCISG
from dg_lightning.methods.groupdro import GroupDRO
from dg_lightning.methods.irm import IRM
from dg_lightning.methods.mixstyle import MixStyle
from dg_lightning.methods.mixup import Mixup
from dg_lightning.methods.mmd import MMD
from dg_lightning.methods.multispace import MultiSpace
from dg_lightning.methods.rise import RISE
from dg_lightning.methods.sagnet import SagNet
from dg_lightning.methods.ssl import SSL
from dg_lightning.methods.swad import SWAD
from dg_lightning.methods.vrex import VREx

__all__ = ["CORAL", "DANN", "DDM", "ERM", "GCISG", "IRM", "MMD", "RISE", "SSL", "SWAD", "Fish", "GroupDRO",
           "MixStyle", "Mixup", "MultiSpace", "SagNet", "VREx"]
