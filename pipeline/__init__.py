"""fastbert-ray: FastBERT (Liu et al., ACL 2020) as a streaming batch system on Ray."""

__all__ = ["FastBert", "FastBertConfig", "FastBertOutput", "Scorer", "uncertainty"]


def __getattr__(name: str):
    # imported on first use, so that modules of the package that need no torch (the scoring
    # job's CPU tasks import pipeline.scoring and pipeline.text) do not import it through here
    if name == "Scorer":
        from pipeline.engine import Scorer

        return Scorer
    if name == "FastBertConfig":
        from pipeline.config import FastBertConfig

        return FastBertConfig
    if name in __all__:
        from pipeline import model

        return getattr(model, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
