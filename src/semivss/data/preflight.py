"""Check everything a training run will read before its first iteration.

A corrupt or missing frame otherwise surfaces hours into a run (a validation frame only at the
first evaluation). The pass decodes what is read with its label (labeled training frames,
validation frames) in full, which also checks label values and sizes against the images, and
reads only the header of every other training frame (the unlabeled pool can be very large).
Errors are the readers' own DataErrors, naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence

from semivss.data.video import FrameRef, VideoSet

__all__ = ["preflight"]


def preflight(
    checks: Sequence[tuple[VideoSet, Sequence[FrameRef], bool]], report: bool = True
) -> dict[str, int]:
    """Check ``(videoset, frames, decode)`` groups: ``decode`` reads image and label in full,
    otherwise the image header only. Returns counts; raises the first DataError. ``report``:
    show the progress (``make_progress``: a bar on a terminal, lines otherwise; False on DDP
    ranks other than 0)."""
    from semivss.progress import make_progress

    total = sum(len(frames) for _, frames, _ in checks)
    decoded = headers = 0
    with make_progress(report) as bar:
        task = bar.add_task("checking frames before training", total=total)
        for videoset, frames, decode in checks:
            for ref in frames:
                if decode:
                    videoset.read_image(ref)
                    if videoset.has_label(ref):
                        videoset.read_label(ref)
                    decoded += 1
                else:
                    videoset.image_size(ref)
                    headers += 1
                bar.advance(task)
    return {"decoded": decoded, "headers": headers}
