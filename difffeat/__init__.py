"""difffeat: diffusion networks as feature extractors.

The main entry points::

    from difffeat import create_backbone, FeatureExtractor, FeatureStore
"""

from difffeat.backbones import create_backbone, list_backbones
from difffeat.extract import FeatureExtractor
from difffeat.store import FeatureStore

__all__ = ["FeatureExtractor", "FeatureStore", "__version__", "create_backbone", "list_backbones"]
__version__ = "0.1.0"
