"""The data layer: sources (CIFAR-10/100, image folders), decoding, the decoded-tensor cache, the
validation holdout, batched on-device augmentation and folder inspection.

It knows nothing of the model: everything here takes and returns plain tensors.
"""

from vitkit.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIT_MEAN,
    VIT_STD,
    AugmentConfig,
    BatchAugment,
    ViewTargets,
    crop_flip,
    preprocess,
)
from vitkit.data.bench import CIFAR_BENCH_CONFIG, bench_augment, bench_data
from vitkit.data.cifar import CIFAR_SPECS
from vitkit.data.dataset import DataSplits, ImageSet, iter_batches
from vitkit.data.decode import (
    DEFAULT_INTERPOLATION,
    IMAGE_EXTENSIONS,
    INTERPOLATIONS,
    BadImagesError,
    decode_image,
    load_image,
    resize_center_crop,
)
from vitkit.data.inspection import format_inspection, inspect_folder
from vitkit.data.preprocessing import ImageLike, Preprocessing
from vitkit.data.sources import load_splits, resolve_data_root
from vitkit.data.split import holdout_split

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_BENCH_CONFIG",
    "CIFAR_SPECS",
    "DEFAULT_INTERPOLATION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "VIT_MEAN",
    "VIT_STD",
    "AugmentConfig",
    "BadImagesError",
    "BatchAugment",
    "DataSplits",
    "ImageLike",
    "ImageSet",
    "Preprocessing",
    "ViewTargets",
    "bench_augment",
    "bench_data",
    "crop_flip",
    "decode_image",
    "format_inspection",
    "holdout_split",
    "inspect_folder",
    "iter_batches",
    "load_image",
    "load_splits",
    "preprocess",
    "resize_center_crop",
    "resolve_data_root",
]
