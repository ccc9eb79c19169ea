"""Models: one architecture family per file, each registering its timm-named factories in
`registry` with its pretrained config and checkpoint converter.

    model = models.create("resnet50", num_classes=14)
    logits = model.apply(variables, images, train=False)   # NHWC float32 in

The families are imported here, so `from medbench_jax import models` sees them all; the
registry itself imports none of them.
"""

# Importing a family registers its models (segmentation models, unet_<encoder> and
# upernet_<encoder>, for the encoders of the others).
from medbench_jax.models import convnext  # noqa: F401
from medbench_jax.models import densenet  # noqa: F401
from medbench_jax.models import resnet  # noqa: F401
from medbench_jax.models import swin  # noqa: F401
from medbench_jax.models import unet  # noqa: F401
from medbench_jax.models import upernet  # noqa: F401
from medbench_jax.models import vit  # noqa: F401
from medbench_jax.models.registry import Converter
from medbench_jax.models.registry import converter
from medbench_jax.models.registry import create
from medbench_jax.models.registry import IMAGENET_MEAN
from medbench_jax.models.registry import IMAGENET_STD
from medbench_jax.models.registry import list_models
from medbench_jax.models.registry import pretrained_cfg
from medbench_jax.models.registry import register

__all__ = ["Converter", "converter", "create", "IMAGENET_MEAN", "IMAGENET_STD", "list_models",
           "pretrained_cfg", "register"]
