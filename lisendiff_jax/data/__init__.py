"""Corpora readers, the data mix, chat formatting and batching."""

from lisendiff_jax.data.example import STYLES, Example

__all__ = ["STYLES", "Example"]
