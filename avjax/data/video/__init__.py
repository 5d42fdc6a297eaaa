"""Video: file I/O at 25 fps + 16 kHz (`io`: streaming reads, MP4 writing, comparison videos,
contact sheets)."""

from avjax.data.video.io import (
    FPS,
    SAMPLE_RATE,
    VideoChunk,
    VideoError,
    VideoInfo,
    VideoWriter,
    comparison_frames,
    contact_sheet,
    iter_video,
    probe_video,
    read_video,
    write_comparison_video,
    write_contact_sheet,
    write_video,
)

__all__ = [
    "FPS",
    "SAMPLE_RATE",
    "VideoChunk",
    "VideoError",
    "VideoInfo",
    "VideoWriter",
    "comparison_frames",
    "contact_sheet",
    "iter_video",
    "probe_video",
    "read_video",
    "write_comparison_video",
    "write_contact_sheet",
    "write_video",
]
