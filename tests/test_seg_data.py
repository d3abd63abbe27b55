"""Segmentation data: every dataset read from its official layout, every label mapping, the paired
augmentation, the source -> targets data module, and the errors a wrong root gets."""

import numpy as np
import pytest
import torch
from PIL import Image

from dg_lightning.data.segmentation import (
    ACDC,
    BDD100K,
    GTA5,
    CamVid,
    Cityscapes,
    DarkZurich,
    MapillaryVistas,
    SegmentationDG,
    train_augmentation,
)
from dg_lightning.data.segmentation.base import PairedDataset, expand_root
from dg_lightning.data.segmentation.labels import CAMVID_CLASSES, CITYSCAPES_ID_TO_TRAIN
from tests.conftest import SHARED_DATA
from tests.seg_trees import (
    write_acdc,
    write_bdd,
    write_camvid,
    write_cityscapes,
    write_dark_zurich,
    write_gta5,
    write_mapillary,
)


def rows(label: np.ndarray) -> list[int]:
    """The value of each row of a label image written by ``ids_image`` (rows are constant)."""
    assert (label == label[:, :1]).all()
    return label[:, 0].tolist()


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    # road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13, unlabeled 0 -> 255, sky 23 -> 10
    ds = Cityscapes(str(write_cityscapes(tmp_path / "cs")), split="val")
    assert len(ds) == 2
    image, label = ds[0]
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    assert rows(label)[:5] == [0, 1, 13, 255, 10]
    # every official id: 19 map to 0..18, all others (void, parking, guard rail, caravan, ...) to 255
    assert sorted(CITYSCAPES_ID_TO_TRAIN.values()) == list(range(19))
    assert ds.table[9] == 255 and ds.table[29] == 255 and ds.table[-1] == 255  # parking, caravan, plate


def test_cityscapes_jpeg_suffix_and_its_error(tmp_path):
    root = write_cityscapes(tmp_path / "cs", suffix=".jpg")
    with pytest.raises(FileNotFoundError, match="set image_suffix"):
        len(Cityscapes(str(root), split="val"))
    assert len(Cityscapes(str(root), split="val", image_suffix="_leftImg8bit.jpg")) == 2


def test_gta5_split_mat_and_label_resized_to_its_image(tmp_path):
    root = write_gta5(tmp_path / "gta5")
    train = GTA5(str(root), split="train")
    assert [p[0].name for p in train.pairs] == ["00001.png", "00002.png", "00003.png"]
    assert len(GTA5(str(root), split="val")) == 1 and len(GTA5(str(root))) == 4  # "all"
    image, label = train[1]  # image 2: its label was written at half size
    assert label.shape == image.shape[:2] == (20, 36)
    assert set(np.unique(label)) == {0, 13, 255}  # ids 7 (road), 26 (car), 3 (out of roi)


def test_dark_zurich_train_ids_and_label_ids(tmp_path):
    root = write_dark_zurich(tmp_path / "dz")
    assert rows(DarkZurich(str(root))[0][1])[:3] == [0, 10, 255]
    assert rows(DarkZurich(str(root), label_type="labelIds")[0][1])[:3] == [0, 10, 255]


def test_acdc_one_target_per_condition(tmp_path):
    root = write_acdc(tmp_path / "acdc")
    fog, night = ACDC(str(root), condition="fog"), ACDC(str(root), condition="night")
    assert (fog.name, night.name) == ("acdc_fog", "acdc_night")
    assert len(fog) == 2 and rows(night[1][1])[:3] == [2, 8, 255]
    with pytest.raises(FileNotFoundError, match="rgb_anon/snow/val"):
        len(ACDC(str(root), condition="snow"))


def test_bdd100k_reads_train_ids(tmp_path):
    ds = BDD100K(str(write_bdd(tmp_path / "bdd")), split="val")
    assert len(ds) == 2 and rows(ds[0][1])[:3] == [13, 0, 255]


def test_mapillary_66_classes_map_onto_19(tmp_path):
    ds = MapillaryVistas(str(write_mapillary(tmp_path / "mv")))
    # road, marking--general, manhole -> road; curb -> sidewalk; pole, utility pole -> pole;
    # void--unlabeled, void--car-mount -> ignore; car -> car; motorcyclist -> rider
    assert rows(ds[0][1])[:10] == [0, 0, 0, 1, 5, 5, 255, 255, 13, 12]


def test_camvid_11_classes_sequences_and_segnet_paths(tmp_path):
    root = write_camvid(tmp_path / "camvid")
    ds = CamVid(str(root), split="test")
    assert len(ds) == 4
    assert rows(ds[0][1])[:4] == [10, 0, 13, 255]  # sky, road, car, unlabelled
    assert ds.eval_classes == CAMVID_CLASSES and len(CAMVID_CLASSES) == 11
    dusk = CamVid(str(root), sequences=["0001TP"], name="camvid_dusk")
    assert len(dusk) == 2 and all(p[0].name.startswith("0001TP") for p in dusk.pairs)
    assert len(CamVid(str(root), exclude_sequences=["0001TP"])) == 2


def test_missing_root_names_the_layout_and_the_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        len(Cityscapes(str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert "does not exist" in msg and "leftImg8bit/{train,val,test}" in msg and "csDownload" in msg


def test_missing_label_names_its_image(tmp_path):
    root = write_cityscapes(tmp_path / "cs")
    next((root / "gtFine").rglob("*_labelIds.png")).unlink()
    with pytest.raises(FileNotFoundError, match="the label of .*_leftImg8bit.png is missing"):
        len(Cityscapes(str(root)))


def test_root_expands_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("DG_TEST_DATA", str(tmp_path))
    assert expand_root("${DG_TEST_DATA:-/nope}/camvid") == tmp_path / "camvid"
    monkeypatch.delenv("DG_TEST_DATA")
    assert str(expand_root("${DG_TEST_DATA:-/fallback}/camvid")) == "/fallback/camvid"


def test_paired_augmentation_moves_labels_with_pixels():
    """Image pixel values encode the label, so every geometric step must keep them equal; padding
    is ignore (255) in the label."""
    rng = np.random.RandomState(0)
    label = np.kron(rng.randint(0, 19, (5, 6)), np.ones((8, 8), dtype=int)).astype(np.uint8)  # 40 x 48 blocks
    image = np.repeat((label * 10 + 20)[..., None], 3, axis=2)  # no label encodes black (the padding)
    aug = train_augmentation(crop_size=64, scale_range=(0.5, 2.0), color_jitter=0.0, blur_prob=0.0)
    for seed in range(20):
        aug.set_random_seed(seed)
        out = aug(image=image, mask=label)
        img, lbl = out["image"], out["mask"]
        assert img.shape == (64, 64, 3) and lbl.shape == (64, 64)
        valid = lbl != 255
        assert valid.any() and set(np.unique(lbl[valid])) <= set(range(19))  # nearest: no new ids
        # on label edges the image is interpolated (and cv2's nearest sits up to a pixel off bilinear):
        # compare where the 5x5 label patch is constant
        core = valid.copy()
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                core &= np.roll(np.roll(lbl, dy, 0), dx, 1) == lbl
        assert core.any()
        assert np.abs(img[..., 0][core].astype(int) - (lbl[core].astype(int) * 10 + 20)).max() <= 2
        assert (img[~valid] == 0).all()  # the padded area: black image, ignore label


def test_paired_augmentation_is_seeded_per_sample():
    data = [(np.random.RandomState(i).randint(0, 255, (40, 40, 3), dtype=np.uint8),
             np.random.RandomState(i).randint(0, 19, (40, 40)).astype(np.uint8)) for i in range(2)]
    ds = PairedDataset(data, 0, transform=train_augmentation(32))
    a, b, c = ds[(1, 7)], ds[(1, 7)], ds[(1, 8)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.float32 and 0 <= a[0].min() and a[0].max() <= 1 and a[1].dtype == torch.long


def test_albumentations_rejects_unknown_arguments():
    """strict Compose: an argument albumentations 2.x does not know (a 1.x name) is an error."""
    import albumentations as A

    with pytest.raises(ValueError):
        A.Compose([A.PadIfNeeded(8, 8, value=0, mask_value=255)], strict=True)


def test_data_module_source_holdout_and_one_loader_per_target(tmp_path):
    cs = write_cityscapes(tmp_path / "cs", split="train", n=10, h=48, w=64)
    write_cityscapes(tmp_path / "cs", split="val", n=3, h=48, w=64)
    cv = write_camvid(tmp_path / "camvid")
    dm = SegmentationDG(
        source=Cityscapes(str(cs), split="train"),
        targets=[Cityscapes(str(cs), split="val"), CamVid(str(cv)), CamVid(str(cv), sequences=["0001TP"], name="dusk")],
        holdout_fraction=0.2, crop_size=32, batch_size=2, eval_batch_size=2, steps_per_epoch=3, split_seed=0,
    )
    dm.setup("fit")
    assert dm.num_classes == 19 and dm.train_domains == ["cityscapes"] == dm.val_domains
    assert dm.test_domains == ["cityscapes", "camvid", "dusk"]
    assert dm.eval_classes("camvid") == list(CAMVID_CLASSES) and dm.eval_classes("cityscapes") is None
    train, val = dm._split
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    x, y, d, idx = batches[0]
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32) and (d == 0).all()
    tests = dm.test_dataloader()
    assert [len(loader.dataset) for loader in tests] == [3, 4, 2]
    x, y, d, _ = next(iter(tests[1]))
    assert x.shape == (2, 3, 24, 32) and y.shape == (2, 24, 32) and (d == 2).all()  # native size
    assert "camvid: test, 4 images, scored over 11 classes" in dm.describe()


def test_data_module_rejects_duplicate_target_names(tmp_path):
    cv = str(write_camvid(tmp_path / "camvid"))
    with pytest.raises(ValueError, match="target names must differ"):
        SegmentationDG(source=CamVid(cv), targets=[CamVid(cv), CamVid(cv, sequences=["0001TP"])])


def test_eval_scale_resizes_images_not_labels(tmp_path):
    cv = write_camvid(tmp_path / "camvid")
    ds = PairedDataset(CamVid(str(cv)), 1, eval_scale=0.5)
    x, y, _, _ = ds[0]
    assert x.shape == (3, 12, 16) and y.shape == (24, 32)


@pytest.mark.realdata
def test_official_cityscapes_sample_is_read_unchanged():
    """The 8 official pairs: labelIds mapped by our table agree with the official labelTrainIds files
    (each id's most frequent official train id is the table's)."""
    root = SHARED_DATA / "cityscapes-sample"
    if not (root / "leftImg8bit").is_dir():
        pytest.skip(f"{root} not found (set DG_SHARED_DATA)")
    ids, train_ids = Cityscapes(str(root), split="train"), Cityscapes(str(root), split="train", label_type="labelTrainIds")
    assert len(ids) == 8 and {p[0].parent.name for p in ids.pairs} == {"aachen", "bochum"}
    raw_all, official_all = [], []
    for (_, lbl_path), (_, official) in zip(ids.pairs, (train_ids[i] for i in range(8))):
        raw_all.append(np.asarray(Image.open(lbl_path)).ravel())
        official_all.append(official.ravel())
    raw, official = np.concatenate(raw_all), np.concatenate(official_all)
    for k in np.unique(raw):
        values, counts = np.unique(official[raw == k], return_counts=True)
        assert values[counts.argmax()] == ids.table[k], f"label id {k}"
    assert (ids.table[raw] == official).mean() > 0.99  # the rest: resized borders
