"""fastbert-ray: FastBERT (Liu et al., ACL 2020) as a streaming batch system on Ray."""

from pipeline.engine import Scorer
from pipeline.model import FastBert, FastBertConfig, FastBertOutput, uncertainty

__all__ = ["FastBert", "FastBertConfig", "FastBertOutput", "Scorer", "uncertainty"]
