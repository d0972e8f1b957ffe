"""geometry: how post-training moves an LLM's weights, measured in parameter space."""

from importlib import import_module

__all__ = ["analyze", "load", "Analysis", "AnalysisConfig", "Run", "Row", "Table", "GeometryError",
           "GeometryCallback", "GradientProjectionCallback", "Recorder", "RecorderConfig"]

_WHERE = {"analyze": "offline.analyze", "Analysis": "offline.analyze", "Run": "offline.analyze",
          "load": "offline.outputs", "AnalysisConfig": "offline.config", "Row": "table", "Table": "table",
          "GeometryError": "errors", "GeometryCallback": "capture.callbacks",
          "GradientProjectionCallback": "capture.callbacks", "Recorder": "capture.recorder",
          "RecorderConfig": "capture.recorder"}


def __getattr__(name: str):
    # lazy, so that `geometry --help` or a bad-input error does not wait for torch and transformers to import
    if name not in _WHERE:
        raise AttributeError(f"module 'geometry' has no attribute {name!r}")
    return getattr(import_module(f"geometry.{_WHERE[name]}"), name)
