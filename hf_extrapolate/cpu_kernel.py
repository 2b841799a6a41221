"""The fused CPU step: `fast_step` for float32 CPU tensors in a handful of passes per row (`csrc/directional_step.cpp`).

`fast_step` in eager torch makes some twenty passes over the `(B, V)` scores per sampled step (each an ATen kernel:
two log-softmaxes, the criterion, the kept and replaced mass, Eq. 7's logits and softmax, the mixture and its log).
At a small model's decoding step those passes are a few per cent of the step. The fused kernel computes the same
distribution row by row in four or five passes, with exp / log inlined under AVX-512 (within 1 ulp; ATen's SLEEF ones elsewhere) and no intermediate
tensor: a max pass, a sum-of-exp pass, one pass forming the criterion, the kept mass and Eq. 7's logits, one
sum-of-exp pass for the redraw (skipped when it is the RL distribution itself: gamma 0, temperature 1), and the log
of the mixture (a vector where some q < 1e-30 redone in log space, exact everywhere). Under greedy decoding the
redraw is computed only on rows where the criterion fires at the proposal's argmax.

It is opt-in, because it is compiled on this machine with `torch.utils.cpp_extension` (a C++17 compiler and ninja;
about a minute on two cores, then cached under `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`):

    import hf_extrapolate.cpu_kernel
    hf_extrapolate.cpu_kernel.enable()       # or HF_EXTRAPOLATE_CPU_KERNEL=1 in the environment

After that every `fast_step` on CPU float32 scores (the logits processor, so the wrapper too, and the vLLM processor) runs
through it; `disable()` goes back to eager torch. The results agree with `fast_step`'s eager form and with
`directional_step_with_replacement` to float32 rounding (`tests/test_cpu_kernel.py`); the compiled code is built
for the CPU capability torch itself dispatches to (AVX512, AVX2, or portable code).
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings

import torch

ENV = "HF_EXTRAPOLATE_CPU_KERNEL"
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "directional_step.cpp")

_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}

_lock = threading.Lock()
_module = None
_env_tried = False


def capability() -> str:
    """The vector instruction set the kernel is compiled for: the one torch's own CPU kernels dispatch to."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _FLAGS else "DEFAULT"


def _build(verbose: bool):
    from torch.utils.cpp_extension import load

    cap = capability()
    with open(_SOURCE, "rb") as source:  # the source's hash in the name: a cached build of another source never loads
        digest = hashlib.sha256(source.read()).hexdigest()[:12]
    return load(
        name=f"hf_extrapolate_directional_step_{digest}_{cap.lower()}",
        sources=[_SOURCE],
        extra_cflags=["-O3", *_FLAGS.get(cap, [])],  # runs on one thread (no OpenMP flags): decode rows are few
        verbose=verbose,
    )


def enable(verbose: bool = False) -> None:
    """Compile (first time; cached afterwards) and switch on the fused CPU step. Raises with the compiler's message
    if the build fails (the eager path stays in use)."""
    global _module
    with _lock:
        if _module is None:
            try:
                _module = _build(verbose)
            except Exception as error:  # the compiler's own message, with what to do
                raise RuntimeError(
                    f"hf_extrapolate.cpu_kernel.enable(): building {_SOURCE} failed ({type(error).__name__}: {error}). "
                    "It needs a C++17 compiler and ninja (`pip install ninja`); without them the eager torch path "
                    "(the default) computes the same step."
                ) from error


def disable() -> None:
    """Go back to the eager torch step (the compiled module stays loaded for a later `enable`)."""
    global _module, _env_tried
    with _lock:
        _module = None
        _env_tried = True  # an explicit disable wins over the environment variable


def enabled() -> bool:
    return _module is not None


def active():
    """The compiled module when the fused step is on (or asked for by `HF_EXTRAPOLATE_CPU_KERNEL=1`), else None.
    A build asked for by the environment that fails warns once and leaves the eager path on."""
    global _env_tried
    if _module is None and not _env_tried:
        _env_tried = True
        if os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            try:
                enable()
            except RuntimeError as error:
                warnings.warn(f"{ENV} is set, but {error}", RuntimeWarning, stacklevel=3)
    return _module
