import numpy as np
import pytest
import torch

from dg_lightning.core.data import DomainBalancedSampler, ShardSampler, holdout_split
from dg_lightning.data import SyntheticShapes
from dg_lightning.data.synthetic import SHAPES, STYLES, generate


def test_holdout_split_disjoint_complete_and_seeded():
    i_in, i_out = holdout_split(101, 0.2, seed=3)
    assert len(i_out) == 20 and len(i_in) == 81
    assert not set(i_in) & set(i_out)
    assert sorted(np.concatenate([i_in, i_out])) == list(range(101))
    again_in, _ = holdout_split(101, 0.2, seed=3)
    other_in, _ = holdout_split(101, 0.2, seed=4)
    assert np.array_equal(i_in, again_in)
    assert not np.array_equal(i_in, other_in)


def _batches(sampler, per_batch):
    idx = [i for i, _ in sampler]
    return [idx[i:i + per_batch] for i in range(0, len(idx), per_batch)]


def test_balanced_sampler_every_batch_has_every_domain():
    sizes = [5, 13, 40]
    s = DomainBalancedSampler(sizes, batch_size=4, steps=7, seed=0)
    offsets = np.cumsum([0] + sizes)
    batches = _batches(s, 12)
    assert len(batches) == 7 and len(s) == 84
    for b in batches:
        dom = np.searchsorted(offsets, b, side="right") - 1
        assert list(dom) == [0] * 4 + [1] * 4 + [2] * 4
    # the small domain is cycled without replacement: every sample appears before any repeats
    first = [i for b in batches for i in b[:4]][:5]
    assert sorted(first) == list(range(5))


def test_balanced_sampler_epoch_and_rank():
    a = DomainBalancedSampler([10, 10], 2, 5, seed=1)
    e0 = list(a)
    assert len({seed for _, seed in e0}) == len(e0)  # every draw gets its own augmentation seed
    a.set_epoch(1)
    assert list(a) != e0
    a.set_epoch(0)
    assert list(a) == e0
    # domains large enough that one shuffle covers the epoch: ranks never draw the same sample
    r0 = DomainBalancedSampler([40, 40], 2, 5, seed=1, rank=0, world_size=2)
    r1 = DomainBalancedSampler([40, 40], 2, 5, seed=1, rank=1, world_size=2)
    all0, all1 = [i for i, _ in r0], [i for i, _ in r1]
    assert len(all0) == len(all1) == 20 and not set(all0) & set(all1)
    for b0, b1 in zip(_batches(r0, 4), _batches(r1, 4)):
        assert [i >= 40 for i in b0] == [i >= 40 for i in b1] == [False, False, True, True]


def test_shard_sampler_partitions():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert [len(ShardSampler(11, r, 3)) for r in range(3)] == [len(s) for s in shards]


def test_synthetic_is_deterministic_and_styles_differ():
    a, b = generate(4, 24, seed=0), generate(4, 24, seed=0)
    assert len(a) >= 4 and len(SHAPES) >= 5
    for s in STYLES:
        assert np.array_equal(a[s][0], b[s][0])
        assert np.bincount(a[s][1]).tolist() == [4] * len(SHAPES)  # same content in every style
    means = {s: a[s][0].reshape(-1, 3).mean(0) for s in STYLES}
    assert np.abs(means["sketch"] - means["painting"]).max() > 20  # styles look different


def test_datamodule_loaders_split_and_balance():
    dm = SyntheticShapes(per_class=10, test_domains=["sketch"], batch_size=4, split_seed=0)
    assert dm.train_domains == ["photo", "cartoon", "painting"] and dm.test_domains == ["sketch"]
    assert dm.domain_names == ["photo", "cartoon", "painting", "sketch"]
    for d in dm.train_domains:
        i_in, i_out = dm.split_indices(d, "in"), dm.split_indices(d, "out")
        assert len(i_out) == 12 and not set(i_in) & set(i_out)
    x, y, d, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert d.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(dm.val_dataloader()) == 3 and len(dm.test_dataloader()) == 1
    assert sum(len(b[0]) for b in dm.test_dataloader()[0]) == 60  # whole held-out domain
    assert {int(b[2][0]) for b in dm.test_dataloader()[0]} == {3}
    other = SyntheticShapes(per_class=10, test_domains=["sketch"], split_seed=1)
    assert not np.array_equal(other.split_indices("photo", "out"), dm.split_indices("photo", "out"))


def test_unknown_domain_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown test domain\(s\) \['clipart'\].*photo"):
        SyntheticShapes(test_domains=["clipart"])


def test_holding_out_everything_is_an_error():
    with pytest.raises(ValueError, match="at least one source"):
        SyntheticShapes(test_domains=list(STYLES))


def test_augmentation_is_a_function_of_the_sample_seed():
    dm = SyntheticShapes(per_class=4, test_domains=["sketch"], augment="domainbed", split_seed=0)
    ds = dm.dataset("photo", "in", train=True)
    a, b = ds[(0, 123)][0], ds[(0, 123)][0]
    torch.manual_seed(999)  # the global RNG does not matter
    c, other = ds[(0, 123)][0], ds[(0, 124)][0]
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, other)


def test_numpy_and_random_draws_are_seeded_per_sample_too():
    """lightly's blur and solarize draw from NumPy: they are seeded per sample like torch's draws."""
    import random

    def noisy(img):
        return img.float() + float(np.random.rand()) + random.random()

    dm = SyntheticShapes(per_class=4, test_domains=["sketch"], train_transform=noisy, split_seed=0)
    ds = dm.dataset("photo", "in", train=True)
    np.random.seed(1)
    a = ds[(0, 7)][0]
    np.random.seed(2)
    random.seed(2)
    b, other = ds[(0, 7)][0], ds[(0, 8)][0]
    assert torch.equal(a, b) and not torch.equal(a, other)
    state = np.random.get_state()[1].copy()
    ds[(0, 9)]
    assert np.array_equal(np.random.get_state()[1], state)  # the caller's NumPy state is restored


def test_training_batches_carry_each_sample_index():
    dm = SyntheticShapes(per_class=5, test_domains=["sketch"], batch_size=3, split_seed=0)
    loader = dm.train_dataloader()
    train_set = loader.dataset
    _, y, d, index = next(iter(loader))
    for yi, di, i in zip(y, d, index.tolist(), strict=True):
        _, label, domain, same = train_set[i]
        assert same == i and label == yi and domain == di
    # positions index the concatenation: the second domain's samples come after the first's
    assert index[3:6].min() >= train_set.offsets[1] and index[:3].max() < train_set.offsets[1]
