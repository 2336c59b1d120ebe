"""``moas webui``: a local Gradio web UI over the inference pipeline.

``handlers`` holds the plain functions the buttons call (testable without a browser); ``app`` lays out
the page and serves it. Only ``moas.cli`` imports this package, and only with the ``webui`` extra.
"""

import os

# A local tool should not phone home: Gradio's usage analytics and update check are off unless the user
# turns them on. Set here so it holds before ``gradio`` is first imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
