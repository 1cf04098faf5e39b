"""semivss.data: videos with sparse labels, dataset readers, splits, clip datasets, transforms.

Importing this package registers the built-in dataset formats (:data:`semivss.registry.FORMATS`):
``semivss.data.formats`` registers its readers; a new format module is one more import line here
(docs/extending.md)."""

from semivss.data.clips import (
    EvalFrames,
    LabeledClips,
    UnlabeledClips,
    collate,
    pick_neighbours,
)
from semivss.data.config import DataConfig, SplitConfig, build_augment, build_split, load_videosets
from semivss.data.formats import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    FORMATS,
    load_camvid,
    load_cityscapes,
    load_dataset,
    load_folder,
    load_vspw,
)
from semivss.data.splits import Split, all_labeled, every_kth, nearest_labeled_offset, single_frame
from semivss.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from semivss.data.transforms import (
    MEAN,
    STD,
    ClipAugment,
    EvalResize,
    StrongPhotometric,
    denormalize,
    label_to_tensor,
    to_tensor,
)
from semivss.data.video import (
    IGNORE_INDEX,
    Frame,
    FrameRef,
    Video,
    VideoSet,
    default_palette,
    make_label_lut,
)

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "FORMATS",
    "IGNORE_INDEX",
    "MEAN",
    "STD",
    "SYNTHETIC_CLASSES",
    "ClipAugment",
    "DataConfig",
    "EvalFrames",
    "EvalResize",
    "Frame",
    "FrameRef",
    "LabeledClips",
    "Split",
    "SplitConfig",
    "StrongPhotometric",
    "UnlabeledClips",
    "Video",
    "VideoSet",
    "all_labeled",
    "build_augment",
    "build_split",
    "collate",
    "default_palette",
    "denormalize",
    "every_kth",
    "generate_synthetic",
    "label_to_tensor",
    "load_camvid",
    "load_cityscapes",
    "load_dataset",
    "load_folder",
    "load_videosets",
    "load_vspw",
    "make_label_lut",
    "nearest_labeled_offset",
    "pick_neighbours",
    "single_frame",
    "to_tensor",
]
