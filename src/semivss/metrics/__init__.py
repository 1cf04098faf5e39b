"""semivss.metrics: confusion-matrix metrics, VC_n and the offset analysis (docs/methods.md#9-metrics,
docs/methods.md#10-inner-video-overfitting)."""

from semivss.metrics.confusion import ConfusionMatrix, metrics_from_matrix
from semivss.metrics.offset import (
    OffsetRow,
    OffsetTable,
    merge_tables,
    offset_table,
    offset_table_text,
    plot_offsets,
    save_offset_tables,
)
from semivss.metrics.report import Summary, comparison_markdown, load_summary, training_speed
from semivss.metrics.vc import VideoConsistency, vc_window_scores, video_consistency

__all__ = [
    "ConfusionMatrix",
    "OffsetRow",
    "OffsetTable",
    "Summary",
    "VideoConsistency",
    "comparison_markdown",
    "load_summary",
    "merge_tables",
    "metrics_from_matrix",
    "offset_table",
    "offset_table_text",
    "plot_offsets",
    "save_offset_tables",
    "training_speed",
    "vc_window_scores",
    "video_consistency",
]
