"""Server-side PNG export of a chart: optional, with ``kaleido`` 1.x and a Chrome or Chromium.

Kaleido 1 renders a Plotly figure in a headless Chrome (it finds an installed Chrome or
Chromium, or the one ``BROWSER_PATH`` names). Starting that browser costs seconds, so it is
started on the first export and kept (kaleido's sync server) for the next ones (about 1 s
each). Without kaleido the app offers the camera button of Plotly's toolbar only (rendered
by the user's browser, no server-side dependency).
"""

from __future__ import annotations

import importlib.util
import threading
import warnings

AVAILABLE = importlib.util.find_spec("kaleido") is not None
WIDTH = 1400  # pixels before ``scale``: a chart as wide as a laptop screen
_lock = threading.Lock()
_started = False


def png_bytes(fig) -> bytes:
    """The figure as a PNG (2x scale). Raises RuntimeError naming the fix when no browser
    can render it."""
    global _started
    import kaleido

    with _lock:
        if not _started:
            try:
                kaleido.start_sync_server(silence_warnings=True)
            except Exception as err:  # no Chrome / Chromium found, or it would not start
                raise RuntimeError(
                    "PNG export needs Chrome or Chromium (install one, or point BROWSER_PATH "
                    "at it); the camera button of the chart's toolbar works without: "
                    f"{err}") from err
            _started = True
    with warnings.catch_warnings():  # plotly notes that kaleido's options go to the server
        warnings.simplefilter("ignore", UserWarning)
        return fig.to_image(format="png", width=WIDTH, height=fig.layout.height or 500,
                            scale=2)
