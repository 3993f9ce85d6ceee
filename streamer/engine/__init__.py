"""Everything that imports torch or transformers lives in this package."""

from .cache import FeatureCache
from .core import Engine, EngineConfig, EngineStats
from .loader import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["DEFAULT_MODEL", "Engine", "EngineConfig", "EngineStats", "FeatureCache", "LoadedModel", "load_model"]
