"""Models from the zoos by name. No test touches the network: every model is built here, with
random weights saved to a temporary folder, and every "not cached" path points at one."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch
from torch import nn

import advx
from advx.errors import InputError
from advx.zoo import build, hub


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # torchvision built for CUDA torch fails with RuntimeError, not ImportError
        return False
    return True


def _skip_unless(module: str):
    return pytest.mark.skipif(
        not _importable(module), reason=f"optional package {module} is not importable here"
    )


# ---- what every spec shares ---------------------------------------------------------------------


def test_build_returns_eval_mode_so_attacks_do_not_warn():
    net = build("lenet")
    assert not any(m.training for m in net.modules())
    clf = advx.Classifier(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "the model was in training mode" would fail here
        clf(torch.rand(2, 1, 28, 28))


def test_factory_kwargs_reach_the_factory():
    assert build("lenet", num_classes=7)(torch.rand(1, 1, 28, 28)).shape == (1, 7)


def test_a_misspelt_builtin_or_zoo_suggests_close_names():
    with pytest.raises(InputError, match="did you mean resnet20"):
        build("resnet2")
    with pytest.raises(InputError, match="did you mean timm:resnet18"):
        build("tim:resnet18")
    with pytest.raises(InputError, match="did you mean hf:org/model"):
        build("hff:org/model")


def test_a_missing_extra_is_named(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_transformers(name, *a, **k):
        if name.split(".")[0] == "transformers":
            raise ImportError("No module named 'transformers'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    monkeypatch.setattr(importlib, "import_module", lambda n, *a: no_transformers(n))
    with pytest.raises(InputError, match=r"pip install 'advx\[transformers\]'"):
        build("hf:org/model")


# ---- timm's hub layout: config.json + model.safetensors -----------------------------------------


def _random_classifier(seed=0):
    torch.manual_seed(seed)
    net = build("lenet", in_channels=3, num_classes=5)
    # batch statistics play no part in LeNet; the normalization is what the test is about
    return advx.Classifier(net, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))


def test_timm_folder_reads_the_preprocessing_and_gives_the_same_logits(tmp_path):
    clf = _random_classifier()
    hub.save(clf, tmp_path / "m", architecture="lenet", input_size=(3, 28, 28))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == pytest.approx([0.1, 0.2, 0.3])
    loaded = build(f"timm:{tmp_path / 'm'}")
    assert isinstance(loaded, advx.Classifier)
    assert not loaded.net.training
    assert loaded.bounds == (0.0, 1.0)
    assert torch.equal(loaded.mean, clf.mean) and torch.equal(loaded.std, clf.std)
    prep = hub.preprocessing_of(loaded.net)
    assert prep is not None and prep.input_size == (3, 28, 28)
    x = torch.rand(4, 3, 28, 28)
    assert torch.equal(loaded(x), clf(x))
    # and a different mean in the config changes the logits: the config is really read
    config["pretrained_cfg"]["mean"] = [0.0, 0.0, 0.0]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert not torch.allclose(build(f"timm:{tmp_path / 'm'}")(x), clf(x))


def test_timm_folder_without_config_or_weights_says_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        build(f"timm:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "config.json").write_text('{"architecture": "lenet"}')
    with pytest.raises(InputError, match="no model.safetensors"):
        build(f"timm:{tmp_path / 'empty'}")


def test_timm_preprocessing_from_a_pretrained_cfg():
    # the fields of timm's pretrained_cfg / resolve_data_config output
    cfg = {
        "input_size": (3, 224, 224),
        "test_input_size": (3, 288, 288),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
    }
    prep = hub.timm_preprocessing(cfg, source="t")
    assert prep.mean == (0.485, 0.456, 0.406) and prep.std == (0.229, 0.224, 0.225)
    assert prep.input_size == (3, 288, 288) and prep.bounds == (0.0, 1.0)


@_skip_unless("timm")
def test_timm_model_by_name_with_saved_weights(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    clf = build("timm:resnet18", weights=tmp_path / "w.pt", num_classes=4)
    data = timm.data.resolve_data_config({}, model=net)
    assert clf.mean.tolist() == pytest.approx(list(data["mean"]))
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(data["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((x - mean) / std)
    torch.testing.assert_close(clf(x), expected, rtol=1e-5, atol=1e-5)


@_skip_unless("timm")
def test_timm_not_cached_names_the_cache_and_unknown_names_get_suggestions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    with pytest.raises(InputError, match="--download"):
        build("timm:resnet18.a1_in1k")
    with pytest.raises(InputError, match="did you mean.*resnet18"):
        build("timm:resnet1888")


# ---- torchvision --------------------------------------------------------------------------------


@_skip_unless("torchvision")
def test_torchvision_reads_the_weights_transforms_and_never_downloads(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InputError, match=r"hub/checkpoints/resnet18-.*--download"):
        build("torchvision:resnet18:IMAGENET1K_V1")
    with pytest.raises(InputError, match="did you mean resnet18"):
        build("torchvision:resnet1888")
    with pytest.raises(InputError, match="did you mean IMAGENET1K_V1"):
        build("torchvision:resnet18:IMAGENET1K_V9")
    # the user's own weights into the architecture; the transforms of the named weights
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    clf = build("torchvision:resnet18:IMAGENET1K_V1", weights=tmp_path / "w.pt", num_classes=3)
    assert clf.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert hub.preprocessing_of(clf.net).input_size == (3, 224, 224)
    x = torch.rand(2, 3, 64, 64)
    t = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    m, s = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((x - m) / s)
    torch.testing.assert_close(clf(x), expected, rtol=1e-5, atol=1e-5)


def test_torchvision_preprocessing_from_weights_transforms():
    class Transforms:  # the attributes of torchvision's ImageClassification preset
        crop_size = [224]
        resize_size = [232]
        mean = [0.485, 0.456, 0.406]
        std = [0.229, 0.224, 0.225]

    class Weights:
        def transforms(self):
            return Transforms()

    prep = hub.torchvision_preprocessing(Weights(), source="w")
    assert prep.input_size == (3, 224, 224) and prep.std == (0.229, 0.224, 0.225)


# ---- Hugging Face -------------------------------------------------------------------------------


def _save_tiny_vit(folder):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=4,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    processor = ViTImageProcessor(
        size={"height": 16, "width": 16},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )
    processor.save_pretrained(folder)
    return processor


@pytest.mark.slow  # importing transformers alone takes seconds
@_skip_unless("transformers")
def test_hf_model_saved_locally_matches_its_own_processor(tmp_path):
    processor = _save_tiny_vit(tmp_path / "vit")
    clf = build(f"hf:{tmp_path / 'vit'}")
    assert isinstance(clf, advx.Classifier) and not clf.net.training
    assert clf.bounds == (0.0, 1.0)
    assert clf.mean.tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert hub.preprocessing_of(clf.net).input_size == (3, 16, 16)
    # pixels as a user holds them (uint8), through HF's own pipeline and through advx
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    inputs = processor(images=list(pixels), return_tensors="pt", do_resize=False)
    with torch.no_grad():
        expected = clf.net(**inputs).logits
    torch.testing.assert_close(clf(pixels.float() / 255), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@_skip_unless("transformers")
def test_hf_not_cached_names_the_cache_path_and_close_cached_names(tmp_path):
    cache = tmp_path / "cache"
    (cache / "models--org--tiny-vit").mkdir(parents=True)
    with pytest.raises(InputError) as e:
        build("hf:org/tiny-vt", cache_dir=str(cache))
    msg = str(e.value)
    assert str(cache / "models--org--tiny-vt") in msg
    assert "--download" in msg and "hf download org/tiny-vt" in msg
    assert "did you mean org/tiny-vit" in msg


def test_hf_preprocessing_from_a_processor_config():
    cfg = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_center_crop": True,
        "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 224},
    }
    prep = hub.hf_preprocessing(cfg, source="p")
    assert prep.bounds == (0.0, 1.0) and prep.input_size == (3, 224, 224)
    raw = hub.hf_preprocessing({**cfg, "do_rescale": False, "do_normalize": False}, source="p")
    assert raw.bounds == (0.0, 255.0) and raw.mean is None


# ---- RobustBench --------------------------------------------------------------------------------


def test_robustbench_not_cached_names_the_path_searched(tmp_path):
    with pytest.raises(InputError) as e:
        build("robustbench:Standard", dataset="CIFAR10", threat="linf", model_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "cifar10" / "Linf" / "Standard.pt") in msg and "--download" in msg
    with pytest.raises(InputError, match="did you mean Linf"):
        build("robustbench:Standard", threat="Lnf", model_dir=str(tmp_path))


def test_robustbench_preprocessing_from_its_entry():
    assert hub.robustbench_preprocessing({}, "cifar10", "x").input_size == (3, 32, 32)
    entry = {"preprocessing": "Res256Crop224"}
    assert hub.robustbench_preprocessing(entry, "imagenet", "x").input_size == (3, 224, 224)


@_skip_unless("robustbench")
def test_robustbench_model_from_a_directory_laid_out_here(tmp_path):
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    entry = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]["Standard"]
    torch.manual_seed(0)
    net = entry["model"]().eval()
    path = tmp_path / "cifar10" / "Linf" / "Standard.pt"
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    clf = build("robustbench:Standard", dataset="cifar10", threat="Linf", model_dir=str(tmp_path))
    assert clf.mean is None and clf.bounds == (0.0, 1.0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), net(x))
    with pytest.raises(InputError, match="did you mean Standard"):
        build("robustbench:Standar", model_dir=str(tmp_path))


def test_preprocessing_of_an_ordinary_module_is_none():
    assert hub.preprocessing_of(nn.Linear(2, 2)) is None
