from dg_lightning.methods.erm import ERM

__all__ = ["ERM"]
