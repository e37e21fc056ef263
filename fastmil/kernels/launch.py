"""Launch a compiled Triton kernel without going through ``JITFunction.run`` on every call.

``kernel[grid](*args, **kwargs)`` costs the host tens of microseconds per launch in Triton's
Python (binding, specializing, a string cache key of every argument, knob lookups, launch
metadata), more than some of fastmil's kernels take on the GPU. :class:`Launcher` does that work
once per specialization: it keys a launch by what Triton's binder specializes on (the dtype and
16-byte alignment of every pointer, the type, divisibility and unit value of every integer), the
constexprs, the launch options and the device, and calls the cached ``CompiledKernel``
directly. A launch whose key was not seen
yet, a launch under a profiler's launch hooks or Triton's debug mode, and every launch in the
interpreter go through ``JITFunction.run`` as usual. Checked against ``JITFunction.run``'s own
launches with Triton's NVIDIA compiler and a stand-in driver (``tests/test_launch.py``).
"""

from __future__ import annotations

from .config import options

__all__ = ["Launcher", "launcher"]

_runtime = _driver = None  # triton.knobs.runtime and triton.runtime.driver.driver, once imported


def _binder(params):
    """A function with the kernel's signature (plus the launch options) that returns (the
    arguments in the kernel's order, the launch's key). Python binds the arguments in C; the key
    holds, per argument, what Triton's binder specializes on: a pointer's dtype and whether it
    is 16-byte aligned; an integer's type (32 or 64 bits), whether it is 1 and whether it is
    divisible by 16 (only its type for ``do_not_specialize``); a constexpr's value. fastmil's
    kernels name every pointer ``*_ptr``."""
    names = [p.name for p in params]
    parts = []
    for p in params:
        n = p.name
        if p.is_constexpr:
            parts.append(n)
        elif n.endswith("_ptr"):
            parts.append(f"{n}.dtype, {n}.data_ptr() % 16 == 0")
        elif p.do_not_specialize:
            parts.append(f"type({n}), -{2**31} <= {n} < {2**31}, {n} < {2**63}")
        else:
            parts.append(f"type({n}), {n} == 1, {n} % 16 == 0, -{2**31} <= {n} < {2**31}, "
                         f"{n} < {2**63}")
    src = (f"def bind({', '.join(names)}, num_warps=None, num_stages=None):\n"
           f"    return ({', '.join(names)},), (num_warps, num_stages, {', '.join(parts)},)\n")
    namespace = {}
    exec(src, namespace)  # noqa: S102 - code made above from the kernel's parameter names
    return namespace["bind"]


class Launcher:
    """``launcher[grid](*args, **kwargs)``, as ``kernel[grid](...)``, for the JIT function
    ``fn``; every other attribute is the JIT function's."""

    def __init__(self, fn):
        self.fn = fn
        self._kernels = {}  # (device, key) -> CompiledKernel
        self._bind = None  # _binder's function

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        global _runtime, _driver
        if _runtime is None:  # (Triton's modules, looked up once: the launch is a hot path)
            from triton import knobs
            from triton.runtime.driver import driver

            _runtime, _driver = knobs.runtime, driver
        runtime = _runtime  # (the interpreter's functions have no device caches)
        if not hasattr(self.fn, "device_caches") or _hooked(runtime.launch_enter_hook) \
                or _hooked(runtime.launch_exit_hook) or runtime.debug \
                or not options().direct_launch:
            return self.fn[grid](*args, **kwargs)
        driver = _driver
        device = driver.active.get_current_device()
        caches = self.fn.device_caches.get(device)
        if caches is None:  # the first launch on this device sets up the JIT's binder
            return self.fn[grid](*args, **kwargs)
        if self._bind is None:
            self._bind = _binder(self.fn.params)
        values, key = self._bind(*args, **kwargs)
        kernel = self._kernels.get((device, key))
        if kernel is None:  # compiled (or found) and launched by the JIT, then kept
            kernel = self.fn[grid](*args, **kwargs)
            if kernel is not None:
                self._kernels[(device, key)] = kernel
            return kernel
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   driver.active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *values)
        return kernel


def _hooked(hook) -> bool:
    """Whether a launch hook is set (Triton 3.6-3.9 keep an empty HookChain when none is)."""
    return hook is not None and getattr(hook, "calls", True) != []


def launcher(fn) -> Launcher:
    """Decorator: a :class:`Launcher` for the JIT function ``fn``."""
    return Launcher(fn)
