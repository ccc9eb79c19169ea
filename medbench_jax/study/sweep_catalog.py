"""The study's pretrained checkpoints and target data sets, as the sweep files use them.

Checkpoints live below one folder, the checkpoint folder: the sweep arg `ckpt=DIR`, else
$MEDBENCH_CHECKPOINTS, else ./checkpoints. Each is kept exactly as its publisher
distributes it (the URL beside it), at PUBLISHER/FILE below that folder, so files of the
same name (Barlow Twins' resnet50.pth, torchvision's) do not clash; the weights
loader recognises every format. `python -m medbench_jax.study.sweep_catalog` prints the
list (where each file goes, where it comes from). Two need converting first, as their
authors' instructions say: SimCLR v1 (TensorFlow; tonylins/simclr-converter ->
resnet50-1x.pth) and SimCLR v2 (Separius/SimCLRv2-Pytorch -> r50_1x_sk0.pth).

Data sets live below one folder too: `data_root=DIR`, else $MEDBENCH_DATA, else ./data,
each in its publisher's layout in the folder named below (what
`python -m medbench_jax.prepare --manual_dir` takes).
"""

from __future__ import annotations

import dataclasses
import os

from medbench_jax.study import sweep as sweep_lib


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  model: str  # the registered model it initialises
  path: str  # PUBLISHER/FILE below the checkpoint folder
  url: str  # where its authors publish it
  pretraining: str  # data and objective, as the study describes it


_TV = "https://download.pytorch.org/models"
_SWIN = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"
_CONVNEXT = "https://dl.fbaipublicfiles.com/convnext"
_FB = "https://dl.fbaipublicfiles.com"
_PYCONTRAST = "https://www.dropbox.com/sh/87d24jqsl6ra7t2"
_NEWT = "https://cornell.box.com/s/bnyhq5lwobu6fgjrub44zle0pyjijbmw"
_ZENODO_2021 = "https://zenodo.org/record/5205234/files"
_ZENODO_2025 = "https://zenodo.org/records/17627332/files"


def _in1k(model: str, path: str, url: str) -> Checkpoint:
  return Checkpoint(model, path, url, "ImageNet-1K, supervised")


# (model, source label) -> checkpoint. Source labels name the init in sweep points.
CHECKPOINTS: dict[tuple[str, str], Checkpoint] = {
    # Supervised ImageNet-1K: the architectures question.
    ("resnet50", "in1k"): _in1k("resnet50", "torchvision/resnet50-0676ba61.pth",
                                f"{_TV}/resnet50-0676ba61.pth"),
    ("densenet121", "in1k"): _in1k("densenet121", "torchvision/densenet121-a639ec97.pth",
                                   f"{_TV}/densenet121-a639ec97.pth"),
    **{(f"convnext_{size}", "in1k"): _in1k(
        f"convnext_{size}", f"convnext/convnext_{size}_1k_224_ema.pth",
        f"{_CONVNEXT}/convnext_{size}_1k_224_ema.pth") for size in ("tiny", "small", "base")},
    **{(f"swin_{size}_patch4_window7_224", "in1k"): _in1k(
        f"swin_{size}_patch4_window7_224", f"swin/swin_{size}_patch4_window7_224.pth",
        f"{_SWIN}/swin_{size}_patch4_window7_224.pth") for size in ("tiny", "small", "base")},
    # Finer-grained or larger pretraining data: ImageNet-22K (21K classes), iNat2021.
    ("swin_base_patch4_window7_224", "in22k"): Checkpoint(
        "swin_base_patch4_window7_224", "swin/swin_base_patch4_window7_224_22k.pth",
        f"{_SWIN}/swin_base_patch4_window7_224_22k.pth", "ImageNet-22K, supervised"),
    ("swin_base_patch4_window7_224", "in22k_in1k"): Checkpoint(
        "swin_base_patch4_window7_224", "swin/swin_base_patch4_window7_224_22kto1k.pth",
        f"{_SWIN}/swin_base_patch4_window7_224_22kto1k.pth",
        "ImageNet-22K then ImageNet-1K, supervised"),
    ("convnext_base", "in22k"): Checkpoint(
        "convnext_base", "convnext/convnext_base_22k_224.pth",
        f"{_CONVNEXT}/convnext_base_22k_224.pth", "ImageNet-22K, supervised"),
    ("convnext_base", "in22k_in1k"): Checkpoint(
        "convnext_base", "convnext/convnext_base_22k_1k_224.pth",
        f"{_CONVNEXT}/convnext_base_22k_1k_224.pth",
        "ImageNet-22K then ImageNet-1K, supervised"),
    ("resnet50", "inat2021"): Checkpoint(
        "resnet50", "newt/inat2021_supervised_large.pth.tar", _NEWT, "iNat2021, supervised"),
    ("resnet50", "inat2021_mini"): Checkpoint(
        "resnet50", "newt/inat2021_supervised_mini.pth.tar", _NEWT,
        "iNat2021 mini, supervised"),
    # Self-supervised ImageNet-1K ResNet-50s.
    ("resnet50", "barlowtwins"): Checkpoint(
        "resnet50", "barlowtwins/resnet50.pth",
        f"{_FB}/barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth",
        "ImageNet-1K, Barlow Twins"),
    ("resnet50", "swav"): Checkpoint(
        "resnet50", "swav/swav_800ep_pretrain.pth.tar",
        f"{_FB}/deepcluster/swav_800ep_pretrain.pth.tar", "ImageNet-1K, SwAV"),
    ("resnet50", "deepcluster_v2"): Checkpoint(
        "resnet50", "swav/deepclusterv2_800ep_pretrain.pth.tar",
        f"{_FB}/deepcluster/deepclusterv2_800ep_pretrain.pth.tar",
        "ImageNet-1K, DeepCluster-v2"),
    ("resnet50", "sela_v2"): Checkpoint(
        "resnet50", "swav/selav2_400ep_pretrain.pth.tar",
        f"{_FB}/deepcluster/selav2_400ep_pretrain.pth.tar", "ImageNet-1K, SeLa-v2"),
    ("resnet50", "insdis"): Checkpoint(
        "resnet50", "pycontrast/InsDis.pth", f"{_PYCONTRAST}/AACcsSIt1_Njv7GsmsuzZ6Sta/InsDis.pth",
        "ImageNet-1K, InsDis"),
    ("resnet50", "moco_v1"): Checkpoint(
        "resnet50", "moco/moco_v1_200ep_pretrain.pth.tar",
        f"{_FB}/moco/moco_checkpoints/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar",
        "ImageNet-1K, MoCo-v1"),
    ("resnet50", "moco_v2"): Checkpoint(
        "resnet50", "moco/moco_v2_800ep_pretrain.pth.tar",
        f"{_FB}/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        "ImageNet-1K, MoCo-v2"),
    ("resnet50", "pcl_v1"): Checkpoint(
        "resnet50", "pcl/PCL_v1_epoch200.pth.tar",
        "https://storage.googleapis.com/sfr-pcl-data-research/PCL_checkpoint/"
        "PCL_v1_epoch200.pth.tar", "ImageNet-1K, PCL-v1"),
    ("resnet50", "pcl_v2"): Checkpoint(
        "resnet50", "pcl/PCL_v2_epoch200.pth.tar",
        "https://storage.googleapis.com/sfr-pcl-data-research/PCL_checkpoint/"
        "PCL_v2_epoch200.pth.tar", "ImageNet-1K, PCL-v2"),
    # SimCLR's ResNet-50 (1x) takes unnormalized [0, 1] inputs: registered as resnet50x1.
    ("resnet50x1", "simclr_v1"): Checkpoint(
        "resnet50x1", "simclr/resnet50-1x.pth",
        "https://storage.cloud.google.com/simclr-gcs/checkpoints/ResNet50_1x.zip",
        "ImageNet-1K, SimCLR-v1 (converted by tonylins/simclr-converter)"),
    ("resnet50x1", "simclr_v2"): Checkpoint(
        "resnet50x1", "simclr/r50_1x_sk0.pth",
        "https://console.cloud.google.com/storage/browser/simclr-checkpoints/simclrv2/"
        "pretrained/r50_1x_sk0", "ImageNet-1K, SimCLR-v2 (converted by "
        "Separius/SimCLRv2-Pytorch)"),
    ("resnet50", "infomin"): Checkpoint(
        "resnet50", "pycontrast/InfoMin_800.pth",
        f"{_PYCONTRAST}/AAAzMTynP3Qc8mIE4XWkgILUa/InfoMin_800.pth", "ImageNet-1K, InfoMin"),
    ("resnet50", "pirl"): Checkpoint(
        "resnet50", "pycontrast/PIRL.pth", f"{_PYCONTRAST}/AADN4jKnvTI0U5oT6hTmQZz8a/PIRL.pth",
        "ImageNet-1K, PIRL"),
    ("resnet50", "byol"): Checkpoint(
        "resnet50", "byol/pretrain_res50x1.pkl",
        "https://storage.googleapis.com/deepmind-byol/checkpoints/pretrain_res50x1.pkl",
        "ImageNet-1K, BYOL"),
    # The study's domain-adapted models (ImageNet, then supervised on chest X-rays).
    ("resnet50", "in1k_chestxray14"): Checkpoint(
        "resnet50", "benchmark/ImageNet_chestxray14.pth.tar",
        f"{_ZENODO_2021}/ImageNet_chestxray14.pth.tar", "ImageNet-1K -> ChestX-ray14"),
    ("resnet50", "in1k_chexpert"): Checkpoint(
        "resnet50", "benchmark/ImageNet_chexpert.pth.tar",
        f"{_ZENODO_2021}/ImageNet_chexpert.pth.tar", "ImageNet-1K -> CheXpert"),
    **{(model, "in1k_mimic_cxr_jpg"): Checkpoint(
        model, f"benchmark/domain_adapted_{short}_imagenet_mimic_checkpoint.pth.tar",
        f"{_ZENODO_2025}/domain_adapted_{short}_imagenet_mimic_checkpoint.pth.tar",
        "ImageNet-1K -> MIMIC-CXR")
       for model, short in (("resnet50", "resnet50"),
                            ("swin_base_patch4_window7_224", "swin_base"),
                            ("convnext_base", "convnext_base"))},
}

SSL_METHODS = ("barlowtwins", "swav", "deepcluster_v2", "sela_v2", "insdis", "moco_v1",
               "moco_v2", "pcl_v1", "pcl_v2", "simclr_v1", "simclr_v2", "infomin", "pirl",
               "byol")


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # the data set's name in medbench_jax.prepare
  folder: str  # below the data folder
  task: str  # classification | segmentation


TARGETS = {t.name: t for t in (
    Target("chestxray14", "ChestX-ray14", "classification"),
    Target("chexpert", "CheXpert-v1.0", "classification"),
    Target("shenzhen_cxr", "Shenzhen", "classification"),
    Target("vindr_cxr", "VinDr-CXR", "classification"),
    Target("mimic_cxr_jpg", "MIMIC-CXR-JPG", "classification"),
    Target("siim_acr_pneumothorax", "SIIM-ACR", "segmentation"),
    Target("montgomery", "Montgomery", "segmentation"),
    Target("drive", "DRIVE", "segmentation"),
    Target("jsrt_heart", "JSRT", "segmentation"),
    Target("jsrt_clavicles", "JSRT", "segmentation"),
)}
# The study's target tasks, by kind (the sweeps' data=cls|seg|all).
CLASSIFICATION = ("chestxray14", "chexpert", "shenzhen_cxr", "vindr_cxr")
SEGMENTATION = ("siim_acr_pneumothorax", "montgomery", "drive", "jsrt_heart",
                "jsrt_clavicles")
_GROUPS = {"cls": CLASSIFICATION, "seg": SEGMENTATION, "all": CLASSIFICATION + SEGMENTATION}
# Segmentation networks by encoder: U-Net for ConvNets with a ResNet-like pyramid,
# UperNet for the transformers and ConvNeXt (as in the study).
_UPERNET_FAMILIES = ("swin", "convnext")


def checkpoint_folder(arg: str = "") -> str:
  return arg or os.environ.get("MEDBENCH_CHECKPOINTS") or "checkpoints"


def data_folder(arg: str = "") -> str:
  return arg or os.environ.get("MEDBENCH_DATA") or "data"


def checkpoint(model: str, source: str, folder: str) -> str:
  """The path of `model`'s `source` checkpoint below `folder`."""
  if (model, source) not in CHECKPOINTS:
    known = sorted(s for m, s in CHECKPOINTS if m == model)
    raise ValueError(f"No {source!r} checkpoint of {model} in the catalogue; it has {known}")
  return os.path.join(folder, CHECKPOINTS[(model, source)].path)


def targets(arg: str) -> list[str]:
  """Data set names from a sweep arg: cls, seg, all, or names joined by '+'."""
  names = []
  for part in sweep_lib.split_list(arg):
    for name in _GROUPS.get(part, (part,)):
      if name not in TARGETS:
        raise ValueError(f"Unknown data set {name!r}; allowed: cls, seg, all, "
                         f"{sorted(TARGETS)}")
      names.append(name)
  return list(dict.fromkeys(names))


def config_for(dataset: str, model: str) -> str:
  """The config file and arg of a run of `model` on `dataset` (the study's settings)."""
  if TARGETS[dataset].task == "classification":
    config = "configs/swin.py" if model.startswith("swin") else "configs/resnet50.py"
    return f"{config}:data={dataset},model={model}"
  family = model.split("_")[0]
  if family in _UPERNET_FAMILIES:
    return f"configs/upernet_{family}.py:data={dataset},model=upernet_{model}"
  return f"configs/unet_resnet50.py:data={dataset},model=unet_{model}"


def data_overrides(dataset: str, folder: str) -> dict[str, str]:
  """Where `dataset` lies: config.dataset.manual_dir below the data folder."""
  return {"dataset.manual_dir": os.path.join(folder, TARGETS[dataset].folder)}


def points(dataset: str, model: str, inits: dict[str, object], *, trials: int,
           data_root: str, fractions: tuple[float, ...] = (),
           fixed: dict[str, object] | None = None,
           stage: str = "") -> list[sweep_lib.Point]:
  """`model` on `dataset` from each of `inits` ({label: checkpoint path, "random" or
  sweep.run_of(...)}), at each label fraction (none: all labels), `trials` trials each.
  Named stage=...,data=...,model=...,init=...[,label_fraction=...]."""
  axes = {"model.init": inits}
  if fractions:
    axes["dataset.label_fraction"] = list(fractions)
  labels = {"stage": stage} if stage else {}
  return sweep_lib.grid(f"{config_for(dataset, model)},trials={trials}", axes,
                        fixed={**data_overrides(dataset, data_root), **(fixed or {})},
                        labels={**labels, "data": dataset, "model": model})


def listing() -> str:
  """Every checkpoint: where it goes below the checkpoint folder, and where it comes from."""
  return "\n".join(f"{c.path:<62} {c.model:<30} {c.pretraining}\n    {c.url}"
                   for c in CHECKPOINTS.values())


if __name__ == "__main__":
  print(listing())
