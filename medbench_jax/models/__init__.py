"""Models: one architecture family per file, each registering its timm-named factories in
`registry` with its pretrained config and checkpoint converter.

    model = models.create("resnet50", num_classes=14)
    logits = model.apply(variables, images, train=False)   # NHWC float32 in

The families are imported here, so `from medbench_jax import models` sees them all; the
registry itself imports none of them.
"""

from medbench_jax.models.registry import (IMAGENET_MEAN, IMAGENET_STD, Converter, converter,
                                          create, list_models, pretrained_cfg, register)
from medbench_jax.models import convnext, densenet, resnet, swin, vit  # noqa: F401  (register)
# Segmentation models, registered for the encoders above: unet_<encoder>, upernet_<encoder>.
from medbench_jax.models import unet, upernet  # noqa: F401  (register)
