"""Former single-module home of the encoder; these three names still import from here.

New code imports from the modules that own them: `app.inference.runtime` (`Embedder`,
`load_model`) and `app.inference.loading` (`CONFIG_FILE`).
"""

from app.inference.loading import CONFIG_FILE
from app.inference.runtime import Embedder, load_model

__all__ = ["CONFIG_FILE", "Embedder", "load_model"]
