"""NVRTC without a GPU: compile CUDA source exactly as CuPy does, on any machine that has torch's CUDA wheels.

The CUDA build of torch ships `libnvrtc` (pip package nvidia-cuda-nvrtc); compiling needs no driver and no
device, so CI can compile every kernel instantiation the CuPy launchers can request. `libnvrtc.so.13` has no
RUNPATH: torch is imported first and the builtins library next to it is preloaded, so nothing depends on
LD_LIBRARY_PATH.

    prog = compile_program(source, ["my_kernel<float, 3>"], ["-arch=sm_90", "--std=c++14"])
    prog.lowered["my_kernel<float, 3>"]   # mangled name, as cupy.RawModule.get_function looks it up
    prog.log                              # compiler (and, with --ptxas-options=-v, ptxas) messages

`NvrtcError` carries the compile log. `python -m benchmarks.nvrtc` prints the library found and its version.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
from dataclasses import dataclass, field

# The options CuPy 14 passes for a device of compute capability 9.0 (H100/H200), plus the language standard the
# project's launchers request. `ARCH_OPTION` alone is replaced when another architecture is compiled.
CUPY_OPTIONS = ("-arch=sm_90", "--device-as-default-execution-space", "-ftz=true")


class NvrtcError(RuntimeError):
    """NVRTC is missing, or a program did not compile (the message holds the compile log)."""


@dataclass
class Program:
    """A compiled program: the cubin or PTX bytes, the lowered (mangled) names, and the compile log."""

    binary: bytes
    lowered: dict[str, str]
    log: str
    options: tuple[str, ...] = field(default=())


def find_nvrtc() -> str | None:
    """Path of libnvrtc: torch's nvidia-* wheels first (any site-packages on sys.path), then a CUDA toolkit."""
    patterns = []
    for root in sys.path:
        patterns += [os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*"),
                     os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            patterns.append(os.path.join(os.environ[env], "lib64", "libnvrtc.so*"))
    patterns.append("/usr/local/cuda/lib64/libnvrtc.so*")
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            name = os.path.basename(path)
            if "builtins" not in name and ".alt." not in name:
                return path
    return None


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded libnvrtc (cached). Raises NvrtcError when there is none."""
    import torch  # noqa: F401 - loads the CUDA runtime libraries NVRTC's builtins resolve against

    path = find_nvrtc()
    if path is None:
        raise NvrtcError("libnvrtc not found: install the CUDA build of torch (it brings nvidia-cuda-nvrtc) "
                         "or a CUDA toolkit")
    for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
        if ".alt." not in os.path.basename(builtins):  # NVRTC dlopens it by soname: preload it
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(rc: int, what: str) -> None:
    if rc != 0:
        msg = library().nvrtcGetErrorString(rc).decode()
        raise NvrtcError(f"{what} failed: {msg} ({rc})")


def _read(lib, prog, size_fn: str, get_fn: str) -> bytes:
    size = ctypes.c_size_t()
    _check(getattr(lib, size_fn)(prog, ctypes.byref(size)), size_fn)
    buf = ctypes.create_string_buffer(size.value)
    _check(getattr(lib, get_fn)(prog, buf), get_fn)
    return buf.raw[: size.value]


def compile_program(source: str, name_expressions=(), options=CUPY_OPTIONS, filename: str = "source.cu") -> Program:
    """Compile `source` with the given options and template name expressions; raise NvrtcError with the log.

    The result holds the cubin when the options name a real architecture (-arch=sm_XX), else the PTX.
    """
    lib = library()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), filename.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        for name in name_expressions:
            _check(lib.nvrtcAddNameExpression(prog, name.encode()), f"nvrtcAddNameExpression({name})")
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        log = _read(lib, prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog").rstrip(b"\0").decode(errors="replace")
        if rc != 0:
            raise NvrtcError(f"NVRTC could not compile {filename} with {' '.join(options)}:\n{log}")
        lowered = {}
        for name in name_expressions:
            ptr = ctypes.c_char_p()
            _check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(ptr)), f"nvrtcGetLoweredName({name})")
            lowered[name] = ptr.value.decode()
        real_arch = any(o.startswith(("-arch=sm_", "--gpu-architecture=sm_")) for o in options)
        if real_arch:
            binary = _read(lib, prog, "nvrtcGetCUBINSize", "nvrtcGetCUBIN")
        else:
            binary = _read(lib, prog, "nvrtcGetPTXSize", "nvrtcGetPTX")
        return Program(binary=binary, lowered=lowered, log=log, options=tuple(options))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def main() -> int:
    try:
        print(f"{find_nvrtc()}: NVRTC {'.'.join(map(str, version()))}")
    except NvrtcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
