"""ColoredMNIST / RotatedMNIST as DomainBed builds them, the MNIST CNN, and the `mnist` download entry."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from dg_lightning.core.backbones import create_backbone
from dg_lightning.data.mnist import ColoredMNIST, RotatedMNIST
from tests.conftest import SHARED_DATA
from tests.mnist_trees import bar_images, id_images, image_id, orientation, write_mnist


def md5_seed(*args) -> int:
    """DomainBed's seed_hash, written out here independently of the project's."""
    return int(hashlib.md5(str(args).encode()).hexdigest(), 16) % 2**31


@pytest.fixture(scope="module")
def id_mnist(tmp_path_factory):
    """6,000 images that carry their index (4,000 "training", 2,000 "test"), random digits."""
    images, digits = id_images(6000)
    return write_mnist(tmp_path_factory.mktemp("idmnist"), images, digits, 4000), images, digits


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


def test_colored_mnist_environments_as_domainbed_defines_them(id_mnist):
    root, images, digits = id_mnist
    dm = ColoredMNIST(root=str(root), test_domains=["-90%"], shuffle_seed=3, split_seed=0)
    assert dm.domains == ["+90%", "+80%", "-90%"] and dm.num_classes == 2
    dm.setup()
    seen = []
    for env, flip in zip(dm.domains, (0.1, 0.2, 0.9)):
        ds = dm.dataset(env, "test")
        assert len(ds) == 2000  # 6,000 images dealt to 3 environments
        agree = noisy = 0
        for k in range(len(ds)):
            x, y, _, _ = ds[k]
            assert x.shape == (2, 28, 28) and x.dtype == torch.float32
            colour = int(x[1].sum() > 0)
            assert x[1 - colour].abs().sum() == 0  # the other channel is zeroed
            src = image_id(_uint8(x[colour]))
            assert np.array_equal(_uint8(x[colour]), images[src])  # the digit's pixels / 255, unchanged
            seen.append(src)
            agree += colour == int(y)
            noisy += int(y) != int(digits[src] < 5)
        # colour agrees with the label with probability 1 - flip; the label is flipped with probability 0.25
        # (2,000 draws: 4 standard deviations are 0.027 and 0.039)
        assert abs(agree / len(ds) - (1 - flip)) < 0.027, (env, agree / len(ds))
        assert abs(noisy / len(ds) - 0.25) < 0.039, (env, noisy / len(ds))
    assert sorted(seen) == list(range(6000))  # every image used once, dealt to exactly one environment


def test_colored_mnist_deals_a_seeded_permutation_in_turn(id_mnist):
    root, _, _ = id_mnist
    ids = {}
    for seed in (3, 3, 4):
        dm = ColoredMNIST(root=str(root), shuffle_seed=seed)
        dm.setup()
        ids.setdefault(seed, []).append([int(v) for v in
                                         (dm.environments()["+80%"]["image"][:50, 0, 0].long() - 1) * 250
                                         + dm.environments()["+80%"]["image"][:50, 0, 1].long() - 1])
    assert ids[3][0] == ids[3][1] and ids[3][0] != ids[4][0]  # the seed fixes the environments
    # DomainBed: shuffle with torch.randperm, environment i takes positions i, i + 3, ...
    perm = torch.randperm(6000, generator=torch.Generator().manual_seed(3))
    assert ids[3][0] == perm[1::3][:50].tolist()


def test_domainbed_holdout_and_test_split(id_mnist):
    root, _, _ = id_mnist
    dm = ColoredMNIST(root=str(root), test_domains=["+80%"], split_seed=5, shuffle_seed=0)
    dm.setup()
    for env_index, env in enumerate(dm.domains):
        keys = list(range(2000))  # DomainBed's misc.split_dataset, by hand
        np.random.RandomState(md5_seed(5, env_index)).shuffle(keys)
        out, in_ = sorted(keys[:400]), sorted(keys[400:])
        assert dm.split_indices(env, "out").tolist() == out and dm.split_indices(env, "in").tolist() == in_
    assert dm.test_split == "in"  # DomainBed tests the held-out environment on its "in" split
    assert len(dm.test_dataloader()[0].dataset) == 1600


def test_rotated_mnist_rotations_and_labels(tmp_path):
    images, digits = bar_images(600)
    root = write_mnist(tmp_path, images, digits, 400)
    dm = RotatedMNIST(root=str(root), test_domains=["75"], shuffle_seed=1)
    assert dm.domains == ["0", "15", "30", "45", "60", "75"] and dm.num_classes == 10
    dm.setup()
    labels = []
    for env in dm.domains:
        ds = dm.dataset(env, "test")
        assert len(ds) == 100
        angles = []
        for k in range(len(ds)):
            x, y, _, _ = ds[k]
            assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1
            angle, major = orientation(x[0].numpy())
            angles.append(angle)
            encoded = int(round((np.sqrt(12 * major) - 6) / 2))  # bar length 6 + 2 * digit survives rotation
            assert encoded == int(y), (env, k)
            labels.append(int(y))
        # rotated counter-clockwise by the environment's angle (short bars: a degree of pixel rounding)
        assert np.allclose(angles, float(env), atol=1.0) and abs(np.mean(angles) - float(env)) < 0.3, env
    assert sorted(labels) == sorted(digits.tolist())
    # PIL's bicubic rotation with zero fill, as DomainBed (torchvision's rotate on a PIL image)
    x0 = dm.dataset("30", "test")[0][0][0]
    same = [np.array_equal(np.asarray(Image.fromarray(img).rotate(30, resample=Image.Resampling.BICUBIC,
                                                                     fillcolor=0)), _uint8(x0)) for img in images]
    assert any(same)


def test_missing_mnist_names_path_layout_and_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/train-images-idx3-ubyte(.|\n)*dg-lightning download mnist"):
        ColoredMNIST(root=str(tmp_path))
    with pytest.raises(ValueError, match="needs data.root"):
        RotatedMNIST()
    root = str(write_mnist(tmp_path, *id_images(30), 20))
    with pytest.raises(ValueError, match="unknown test domain"):
        ColoredMNIST(root=root, test_domains=["+70%"])
    with pytest.raises(ValueError, match="not augmented"):
        ColoredMNIST(root=root, augment="domainbed")
    with pytest.raises(ValueError, match="28 x 28"):
        RotatedMNIST(root=root, image_size=64)
    with pytest.raises(ValueError, match="cache_images do not apply"):
        ColoredMNIST(root=root, cache_images=True)


def test_mnist_download_entry_uses_torchvision_and_checks_layout(tmp_path, monkeypatch):
    from dg_lightning.data import download as dl
    from dg_lightning.data import mnist

    calls = []

    def fake_download(root):  # stands in for torchvision's download (no network in tests)
        calls.append(root)
        return write_mnist(root, *id_images(30), 20)

    monkeypatch.setattr(mnist, "download_mnist", fake_download)
    assert dl.download("mnist", tmp_path / "m") == tmp_path / "m" and calls == [tmp_path / "m"]
    with pytest.raises(ValueError, match="do not apply"):
        dl.download("mnist", tmp_path / "m", url="http://example.org/x")


def test_domainbed_mnist_cnn_architecture():
    net = create_backbone("domainbed_mnist_cnn", in_chans=2)
    assert net.num_features == 128
    # DomainBed's MNIST_CNN: 3x3 convs 2->64, 64->128 (stride 2), 128->128, 128->128; GroupNorm(8) after each
    n_params = (2 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + 2 * (128 * 128 * 9 + 128) + 2 * 64 + 3 * 2 * 128
    assert sum(p.numel() for p in net.parameters()) == n_params
    x = torch.rand(3, 2, 28, 28)
    maps = net.forward_features(x)
    assert maps.shape == (3, 128, 14, 14)
    # GroupNorm comes *after* the ReLU: every group of 16 channels is normalised (mean 0, variance 1)
    groups = maps.view(3, 8, -1)
    assert torch.allclose(groups.mean(-1), torch.zeros(3, 8), atol=1e-4)
    assert torch.allclose(groups.var(-1, unbiased=False), torch.ones(3, 8), atol=1e-2)
    assert torch.allclose(net(x), maps.mean(dim=(2, 3)))  # global mean pool
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_backbone("domainbed_mnist_cnn", True)


def test_method_feeds_mnist_cnn_unnormalised_pixels():
    from dg_lightning.methods import ERM

    model = ERM(num_classes=2, backbone="domainbed_mnist_cnn", backbone_args={"in_chans": 2})
    x = torch.rand(2, 2, 28, 28)
    assert torch.equal(model.normalize(x), x)  # DomainBed feeds [0, 1] pixels to the CNN
    assert model(x).shape == (2, 2)


# -- real MNIST (../shared/data/mnist), skipped when absent -----------------------------------------

@pytest.fixture(scope="module")
def real_mnist():
    root = SHARED_DATA / "mnist"
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found at {root} (set DG_SHARED_DATA to run this test)")
    return root


@pytest.mark.realdata
def test_real_colored_mnist_statistics(real_mnist):
    dm = ColoredMNIST(root=str(real_mnist), shuffle_seed=0)
    envs = dm.environments()
    assert [len(envs[e]["label"]) for e in dm.domains] == [23334, 23333, 23333]  # all 70,000 digits
    for env, flip in zip(dm.domains, (0.1, 0.2, 0.9)):
        e = envs[env]
        agree = (e["colour"] == e["label"]).float().mean().item()
        noise = (e["label"] != (e["digit"] < 5).long()).float().mean().item()
        assert abs(agree - (1 - flip)) < 0.01 and abs(noise - 0.25) < 0.01, (env, agree, noise)


@pytest.mark.realdata
def test_real_rotated_mnist_rotations(real_mnist):
    """The mean axis of the real digit 1s turns by 15 degrees from one environment to the next."""
    dm = RotatedMNIST(root=str(real_mnist), shuffle_seed=0)
    envs = dm.environments()
    assert [len(envs[e]["label"]) for e in dm.domains] == [11667] * 4 + [11666] * 2
    mean_axis = []
    for env in dm.domains:
        ones = envs[env]["image"][envs[env]["label"] == 1][:400].numpy()
        doubled = np.radians([2 * orientation(img)[0] for img in ones])
        mean_axis.append(np.degrees(np.angle(np.mean(np.exp(1j * doubled)))) / 2)
    turns = np.diff(np.unwrap(np.radians(2 * np.array(mean_axis))) / 2)
    assert np.allclose(np.degrees(turns), 15, atol=2), np.degrees(turns)
