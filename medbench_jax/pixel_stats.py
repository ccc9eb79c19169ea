"""Pixel normalizations by name: the mean and std (RGB, for pixels in [0, 1]) that a
model's input is standardised with. A leaf: configs and the model registry both read it."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    # ChestX-ray14 statistics used by the reference study's "chestx-ray" option.
    "chestxray": ((0.5056, 0.5056, 0.5056), (0.252, 0.252, 0.252)),
    # The reference study's "none": pixels scaled to [0, 1], nothing else.
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
