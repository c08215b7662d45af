"""Training, export and evaluation of the models (the `train` extra); never used at run time."""


def scaled_channels(n: int, width: float) -> int:
    """`n` channels times a model's width multiplier, a multiple of 8 (XNNPACK's SIMD width)."""
    return max(8, round(n * width / 8) * 8)


def hw_size(text: str) -> tuple[int, int]:
    """An argparse type for HxW sizes (`--window 32x96`, `--input 576x960`)."""
    import argparse

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 32x96") from None
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 8x8")
    return h, w
