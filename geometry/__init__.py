"""geometry: how post-training moves an LLM's weights, measured in parameter space."""

from geometry.analyze import Analysis, Run, analyze
from geometry.config import AnalysisConfig
from geometry.errors import GeometryError
from geometry.table import Row, Table

__all__ = ["analyze", "Analysis", "AnalysisConfig", "Run", "Row", "Table", "GeometryError"]
