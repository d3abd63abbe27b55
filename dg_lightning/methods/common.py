"""What DomainBed's baselines share: per-domain minibatches, pairwise penalties, manual updates.

DomainBed's ``update(minibatches)`` receives one ``(x, y)`` per source domain. Here the data core
already builds that batch (``batch_size`` samples of every source domain, ``domain`` = the source's
index): :func:`domain_indices` and :func:`domain_minibatches` cut it back into DomainBed's list, in
domain order. Under DDP each rank holds a balanced slice of every domain, so the same cut applies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def domain_indices(domain: torch.Tensor) -> list[torch.Tensor]:
    """Positions of each source domain's samples in the batch, domains in ascending index order."""
    return [torch.nonzero(domain == d, as_tuple=True)[0] for d in torch.unique(domain, sorted=True)]


def domain_minibatches(x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DomainBed's ``minibatches``: one ``(x, y)`` per source domain present in the batch."""
    return [(x[i], y[i]) for i in domain_indices(domain)]


def pairwise_mean(features: list[torch.Tensor], distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean of ``distance(f_i, f_j)`` over the pairs ``i < j`` of domains (DomainBed's MMD/CORAL
    penalty: summed over pairs, divided by K(K-1)/2); zero with a single domain."""
    k = len(features)
    total = features[0].new_zeros(())
    for i in range(k):
        for j in range(i + 1, k):
            total = total + distance(features[i], features[j])
    return total / (k * (k - 1) / 2) if k > 1 else total


def reset_optimizer_state(optimizer) -> None:
    """Forget the optimiser's per-parameter state (Adam's moments and step counts), as DomainBed's
    IRM and VREx do by building a new Adam when the penalty weight jumps; learning rates are kept."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    optimizer.state.clear()


class ManualUpdates:
    """Mixin for methods that step their own optimisers (``automatic_optimization = False``): the LR
    schedulers (``scheduler``, ``scheduler_interval``) are stepped here, Lightning does not in manual
    optimisation. Call :meth:`step_schedulers` ``("step")`` at the end of ``training_step``."""

    def step_schedulers(self, interval: str) -> None:
        if self.hparams.scheduler_interval != interval:
            return
        schedulers = self.lr_schedulers()
        for s in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            s.step()

    def on_train_epoch_end(self) -> None:
        self.step_schedulers("epoch")

    def log_terms(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        """Every term as ``train/<name>``, as the base's ``training_step`` logs them."""
        for k, v in terms.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", on_step=True, on_epoch=True, batch_size=batch_size)

    def build_optimizers(self, groups: list[list[torch.nn.Parameter]]):
        """One optimiser from the ``optimizer`` factory (default ``Adam(lr=5e-5)``) per parameter group,
        each with its scheduler from the ``scheduler`` factory when one is given."""
        optimizers = [self.optimizer_factory(g) if self.optimizer_factory is not None
                      else torch.optim.Adam(g, lr=5e-5) for g in groups]
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [{"scheduler": self.scheduler_factory(o), "interval": self.hparams.scheduler_interval}
                            for o in optimizers]
