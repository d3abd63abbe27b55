import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DG_SHARED_DATA") or ROOT.parent / "shared" / "data")
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dg_lightning.cli", *args]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count (benchmarks pin one thread) must not change the
    numerics, hence the outcome, of the tests after it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real_pacs() -> Path:
    root = Path(os.environ.get("PACS_ROOT") or SHARED_DATA / "pacs")  # an empty PACS_ROOT counts as unset
    if not (root / "photo" / "dog").is_dir():
        pytest.skip(f"real PACS not found at {root} (set PACS_ROOT to run this test)")
    return root


def write_fake_pacs(root: Path, per_class: int = 3, size: int = 16, split_files: bool = False) -> Path:
    """A PACS tree in the official layout with ``per_class`` tiny JPEGs per domain and class."""
    rng = np.random.RandomState(0)
    lines = {d: [] for d in PACS_DOMAINS}
    for d in PACS_DOMAINS:
        for k, c in enumerate(PACS_CLASSES):
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                name = f"pic_{i:03d}.jpg"
                Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(root / d / c / name)
                lines[d].append(f"PACS/{d}/{c}/{name} {k + 1}")  # as in the official lists
    if split_files:
        for d, ls in lines.items():
            (root / f"{d}_train_kfold.txt").write_text("\n".join(ls[0::3] + ls[1::3]) + "\n")
            (root / f"{d}_crossval_kfold.txt").write_text("\n".join(ls[2::3]) + "\n")
            (root / f"{d}_test_kfold.txt").write_text("\n".join(ls) + "\n")
    return root


@pytest.fixture
def fake_pacs(tmp_path) -> Path:
    return write_fake_pacs(tmp_path / "pacs")
