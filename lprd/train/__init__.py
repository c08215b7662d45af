"""Training, export and evaluation of the models (the `train` extra); never used at run time."""


def scaled_channels(n: int, width: float) -> int:
    """`n` channels times a model's width multiplier, a multiple of 8 (XNNPACK's SIMD width)."""
    return max(8, round(n * width / 8) * 8)
