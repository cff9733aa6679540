"""pathflow: find and validate the pathways that lead to causal SAE features.

The science lives here and knows nothing of Prefect; ``tasks/`` and ``flows/`` wrap it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pathflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
