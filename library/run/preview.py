"""The interactive mode's preview window (OpenCV), when a display and a GUI build are there."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)


def preview_window() -> Callable[[list], None] | None:
    """A function showing images in an OpenCV window until a key is pressed, or None."""
    try:
        import cv2
        import numpy as np
    except ImportError:
        logger.warning("no preview: OpenCV is not installed (--no_preview hides this)")
        return None
    if os.name != "nt" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        logger.warning("no preview: no display (--no_preview hides this)")
        return None

    def show(pictures) -> None:
        try:
            for picture in pictures:
                cv2.imshow("gen_img", cv2.cvtColor(np.asarray(picture), cv2.COLOR_RGB2BGR))
                cv2.waitKey()
            cv2.destroyAllWindows()
        except cv2.error:
            logger.warning("no preview: this OpenCV has no GUI (pip install opencv-python, or --no_preview)")

    return show
