"""Datasets and the few-shot protocol of the CLIP-LoRA recipe (no model code here)."""

from .datasets import (
    COOP_SPECS,
    LAYOUTS,
    PAPER_DATASETS,
    DatasetError,
    DatasetSplits,
    ImageDataset,
    Sample,
    canonical_name,
    check_images,
    display_name,
    imagenet_classes,
    load_dataset,
    load_image_folder,
    read_image,
    read_split_file,
)
from .sampler import check_shots, load_few_shot, official_few_shot, sample_few_shot, save_few_shot
from .synthetic import make_synthetic, synthetic_classnames

__all__ = [
    "COOP_SPECS",
    "LAYOUTS",
    "PAPER_DATASETS",
    "DatasetError",
    "DatasetSplits",
    "ImageDataset",
    "Sample",
    "canonical_name",
    "check_images",
    "check_shots",
    "display_name",
    "imagenet_classes",
    "load_dataset",
    "load_few_shot",
    "load_image_folder",
    "make_synthetic",
    "official_few_shot",
    "read_image",
    "read_split_file",
    "sample_few_shot",
    "save_few_shot",
    "synthetic_classnames",
]
