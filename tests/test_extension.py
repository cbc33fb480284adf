"""The compiled extension is what serves the operators, and its absence is loud."""

import os
import subprocess
import sys
import textwrap

import torch

import fastlaplace.ops as ops

OPERATORS = ["build_info", *ops.OPS]


def _extension_importable() -> bool:
    try:
        import fastlaplace._C  # noqa: F401
    except ImportError:
        return False
    return True


def test_extension_state_is_reported_truthfully():
    assert ops.extension_loaded() == _extension_importable()
    assert ops.build_info() == ("python" if not ops.extension_loaded() else torch.ops.fastlaplace.build_info())


def test_required_extension_serves_every_operator():
    if os.environ.get("FASTLAPLACE_REQUIRE_EXT") != "1":
        assert not ops.extension_loaded() or ops.build_info().startswith("cpu")
        return
    assert ops.extension_loaded()
    assert ops.build_info() in ("cpu", "cpu,cuda")
    for name in OPERATORS:
        assert hasattr(torch.ops.fastlaplace, name), name
        kernel_devices = [
            key
            for key in ("CPU", "CUDA")
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlaplace::{name}", key)
        ]
        assert name == "build_info" or "CPU" in kernel_devices, f"{name} has no CPU kernel"


def test_required_extension_turns_fallback_into_import_error():
    blocker = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastlaplace._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        try:
            import fastlaplace.ops
        except ImportError as error:
            print("ImportError:", error)
        else:
            print("loaded")
        """
    )
    env = dict(os.environ, FASTLAPLACE_REQUIRE_EXT="1")
    out = subprocess.run([sys.executable, "-c", blocker], env=env, capture_output=True, text=True, check=True)
    assert "ImportError" in out.stdout and "FASTLAPLACE_REQUIRE_EXT" in out.stdout


def test_missing_extension_warns_and_falls_back_to_reference():
    script = textwrap.dedent(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastlaplace._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastlaplace.ops as ops
        print(ops.extension_loaded(), ops.build_info(), any("reference" in str(w.message) for w in caught))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTLAPLACE_REQUIRE_EXT"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "python", "True"]
