"""Loading of the compiled extension ``fastlaplace._C``, whose load registers the operators.

When it is missing, the pure-PyTorch versions of :mod:`fastlaplace.reference` serve the
wrappers instead, with a warning; ``FASTLAPLACE_REQUIRE_EXT=1`` turns that fallback into an
ImportError (CI sets it).
"""

from __future__ import annotations

import os
import warnings

import torch


def _load_extension() -> bool:
    try:
        from fastlaplace import _C  # noqa: F401  (loading registers the operators)
    except ImportError as error:
        if os.environ.get("FASTLAPLACE_REQUIRE_EXT") == "1":
            raise ImportError(
                "FASTLAPLACE_REQUIRE_EXT=1 but the compiled extension fastlaplace._C "
                f"could not be loaded ({error}); build it with "
                "`pip install --no-build-isolation -e .`"
            ) from error
        warnings.warn(
            f"fastlaplace._C is not available ({error}); using the slow pure-PyTorch reference operators",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


#: whether the compiled operators (not the Python reference) serve the wrappers
EXTENSION = _load_extension()


def extension_loaded() -> bool:
    """Whether the compiled operators (not the Python reference) serve these wrappers."""
    return EXTENSION


def build_info() -> str:
    """Devices the extension was compiled for: ``"cpu"`` or ``"cpu,cuda"``; ``"python"`` without it."""
    return torch.ops.fastlaplace.build_info() if EXTENSION else "python"
