"""Any decoded image -> 8-bit RGB, correctly for every mode Pillow opens.

``Image.convert("RGB")`` is right for 8-bit modes but not for the others: 16-bit greyscale PNGs (mode ``I;16``)
and 32-bit integer/float images (``I``, ``F``) are clipped at 255, so they come out almost white; palette, ``LA``
and ``RGBA`` images drop their alpha and show whatever colour the transparent pixels hold. Here:

* ``I;16*``: scaled from 0..65535 to 0..255 (``round(v / 257)``);
* ``I``: 32-bit integers, the form Pillow gives some 16-bit files: scaled from 0..65535 when a value exceeds 255,
  else taken as 8-bit;
* ``F``: floats, scaled from 0..1 when every value is within it, else clipped to 0..255;
* transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry): composited over white;
* everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGB``): Pillow's own conversion.

A mode that cannot be converted raises ``ValueError``; callers skip the sample and count it.
"""
from __future__ import annotations

WHITE = (255, 255, 255)


def to_rgb8(im):
    """A PIL image of any mode -> an 8-bit ``RGB`` PIL image (see the module docstring)."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        import numpy as np

        a = np.asarray(im)
        if mode.startswith("I;16"):
            a8 = np.rint(a.astype(np.float64) / 257.0)
        elif mode == "I":
            a8 = np.rint(a / 257.0) if a.size and a.max() > 255 else a.astype(np.float64)
        else:
            a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            a8 = np.rint(a * 255.0) if a.size and a.min() >= 0.0 and a.max() <= 1.0 else np.rint(a)
        grey = Image.fromarray(np.clip(a8, 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert image mode {mode} to RGB ({e})") from None
