"""Kept so ``featx.transformer.ConvNetFeatures`` still imports: the transformer lives in :mod:`featx.sklearn`."""

from featx.sklearn import ConvNetFeatures

__all__ = ["ConvNetFeatures"]
