"""Where a trace failed, in the user's terms: the last frame outside torch and fxtune.

Both front ends name the user's file and line in their TraceError. Library directories are
matched with a trailing separator, so `site-packages/torch/` hides torch's own frames but not
torchvision's or any other package's whose name starts with "torch".
"""

from __future__ import annotations

import linecache
import os
from dataclasses import dataclass
from types import FrameType, TracebackType

import torch

_LIBRARY_DIRS = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # fxtune itself
)


@dataclass(frozen=True)
class UserFrame:
    """One frame of the traceback that is neither torch's nor fxtune's."""

    filename: str
    lineno: int
    frame: FrameType

    @property
    def line(self) -> str:
        return linecache.getline(self.filename, self.lineno).strip()

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}: {self.line}"


def is_user_file(filename: str) -> bool:
    """False for torch's and fxtune's own files and for generated code (`<eval_with_key>`...)."""
    return not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<")


def user_frames(tb: TracebackType | None) -> list[UserFrame]:
    """The traceback's frames in the user's code (and other libraries'), outermost first."""
    frames = []
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if is_user_file(filename):
            frames.append(UserFrame(filename, tb.tb_lineno, tb.tb_frame))
        tb = tb.tb_next
    return frames
