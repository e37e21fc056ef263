"""A stand-in for Triton's CUDA driver: compile fastmil's kernels for an NVIDIA GPU, and walk
Triton's whole launch path, on a machine without one.

With :class:`StandInDriver` active (``triton.runtime.driver.set_active``), ``kernel[grid](...)``
on CPU tensors binds and specializes the arguments as the JIT does for CUDA tensors (the binder
looks at dtypes, 16-byte alignment and integer values only), compiles through Triton's NVIDIA
pipeline down to a cubin (ptxas included), and hands the launch to a stand-in launcher that
records it instead of calling the GPU. Used by ``tests/aot_compile.py`` (compile only),
``tests/test_launch.py`` (fastmil's launcher against the JIT's own launches) and
``benchmarks/profile.py`` (host time per call with Triton's launch path). Run with
TRITON_INTERPRET unset.
"""

from __future__ import annotations

import collections
import weakref

import torch
from triton.backends.compiler import GPUTarget

# The latest launches handed to a stand-in launcher: (kernel name, grid, stream, args), tensor
# arguments as weak references.
LAUNCHES: collections.deque = collections.deque(maxlen=64)


class _Launcher:
    """Records a launch instead of calling the GPU: what ``CompiledKernel.run`` calls."""

    record = True  # StandInDriver(record=False): count the launches only (host timing)

    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, grid_x, grid_y, grid_z, stream, function, kernel_metadata,
                 launch_metadata, enter_hook, exit_hook, *args):
        if not self.record:
            LAUNCHES.append((self.name, (grid_x, grid_y, grid_z), stream, ()))
            return
        # tensors by weak reference: a record must not keep a gradient alive (autograd then
        # copies it instead of taking it as the parameter's .grad)
        LAUNCHES.append((self.name, (grid_x, grid_y, grid_z), stream,
                         tuple(weakref.ref(a) if torch.is_tensor(a) else a for a in args)))


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class StandInDriver:
    """Just enough of a driver for the JIT to compile for sm_ARCH and to launch (into
    :data:`LAUNCHES`)."""

    def __init__(self, arch: int = 90, record: bool = True):
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils()
        self.launcher_cls = type("Launcher", (_Launcher,), {"record": record})

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")
