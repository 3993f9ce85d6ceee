"""Everything that imports torch or transformers lives in this package."""

from streamer.engine.cache import FeatureCache
from streamer.engine.core import Engine, EngineConfig, EngineStats
from streamer.engine.loader import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["DEFAULT_MODEL", "Engine", "EngineConfig", "EngineStats", "FeatureCache", "LoadedModel", "load_model"]
