"""Without the C++ extension the package still imports, warns once, and runs the torch references."""
import subprocess
import sys

SCRIPT = r"""
import sys, warnings
sys.modules["alignmerge._C"] = None          # as if the extension had not been built
warnings.simplefilter("always")
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import alignmerge
    from alignmerge import ops
    from alignmerge.ops._backend import available_backends, choose_backend
    x, y = torch.randn(37), torch.randn(37)
    a = ops.weighted_sum([x, y], [0.25, 0.75])
    b = ops.weighted_sum([x, y], [0.25, 0.75])
    assert torch.allclose(a, 0.25 * x + 0.75 * y)
    assert choose_backend(x) == "torch" and "cpp" not in available_backends("cpu")
notes = [w for w in caught if "alignmerge._C is not available" in str(w.message)]
print(len(notes))
"""


def test_missing_extension_falls_back_with_one_warning():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env={
        **__import__("os").environ, "TRITON_INTERPRET": "0", "ALIGNMERGE_BACKEND": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "1"
