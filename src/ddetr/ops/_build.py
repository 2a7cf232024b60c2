"""Just-in-time build and loading of the compiled multi-scale deformable attention library.

The C++/CUDA sources in ``csrc/`` are compiled with ``torch.utils.cpp_extension.load`` (ninja) the
first time a compiled backend is asked for, or ahead of time with ``python -m ddetr.ops build``.
The library lands in a cache directory keyed on the torch version, the CUDA toolkit (when CUDA
sources are included), the Python version and a hash of the sources and flags, so a changed source
or a new torch rebuilds into a fresh directory and old builds are never reused by mistake.

Concurrent first use (several pytest workers, DDP ranks) is safe: ``cpp_extension`` holds an OS
file lock (``<build dir>/lock``) while it builds, other processes wait on it, and whoever gets the
lock next finds the build up to date. A ``ready`` marker, written atomically after a successful
load, lets later processes load the library directly without ninja.

The cache sits in a predictable place, so it is trusted only when no other user could have put
code there: the folders are created ``0700``, and a library, its build folder or the cache root that
is not owned by us or is group/world writable is neither built into nor loaded (one warning, then the
PyTorch path, as after a failed build).

Importing this module never needs a compiler: ``torch.utils.cpp_extension`` is imported on first
build only.
"""

from __future__ import annotations

import hashlib
import os
import platform
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

EXTENSION_NAME = "ddetr_ms_deform_attn"
# bump to force a rebuild when the way the library is built changes
_BUILD_RECIPE_VERSION = "1"

_CPU_SOURCES = ("ms_deform_attn.cpp", "cpu/ms_deform_attn_cpu.cpp", "dropout.cpp", "cpu/dropout_cpu.cpp")
_CUDA_SOURCES = ("cuda/ms_deform_attn_cuda.cu",)
_HEADERS = ("ms_deform_attn.h",)
_CXX_FLAGS = ["-O3", "-fopenmp-simd"]
_CUDA_FLAGS = ["-O3"]


def csrc_dir() -> Path:
    """The op's C++/CUDA sources: ``$DDETR_CSRC_DIR`` if set, else ``ddetr/csrc`` inside an installed
    wheel, else the repository's ``csrc/`` (a source checkout or an editable install).

    Raises ``FileNotFoundError`` when the sources are absent.
    """
    override = os.environ.get("DDETR_CSRC_DIR")
    package = Path(__file__).resolve().parents[1]
    candidates = [Path(override)] if override else [package / "csrc", package.parents[1] / "csrc"]
    for directory in candidates:
        if (directory / "ms_deform_attn.cpp").is_file():
            return directory
    raise FileNotFoundError(
        "the C++/CUDA sources of ddetr's deformable attention op were not found in "
        f"{' or '.join(str(d) for d in candidates)}; reinstall ddetr (the wheel ships them in ddetr/csrc) "
        "or set DDETR_CSRC_DIR to a csrc/ directory"
    )


def _cxx_flags() -> list[str]:
    flags = list(_CXX_FLAGS)
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline: without OpenMP it would run the kernels on one thread. The
        # library then binds to the libgomp that torch already loaded (same soname).
        flags.append("-fopenmp")
    # the library is built on the machine that runs it; the CPU model is part of the cache key
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("DDETR_NO_NATIVE", "0") != "1":
        flags.append("-march=native")
    return flags


def _cpu_fingerprint() -> str:
    """Identifies the CPU's instruction set, so a shared home directory never mixes -march=native builds."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    return platform.machine()


class UnsafeCacheError(RuntimeError):
    """The build cache (folder or library) could have been written by another user; nothing is loaded from it."""


def cache_root() -> Path:
    """Root of the build cache: ``$DDETR_BUILD_DIR``, else ``$XDG_CACHE_HOME/ddetr/ops`` (``~/.cache``)."""
    root = os.environ.get("DDETR_BUILD_DIR")
    if root is None:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache_home, "ddetr", "ops")
    return Path(root)


def unsafe_reason(path: Path) -> str | None:
    """Why ``path`` (an existing file or folder) cannot be trusted, or None: it must be owned by us and
    not writable by the group or others. Always None where there are no POSIX owners (Windows)."""
    if not hasattr(os, "getuid"):
        return None
    info = path.stat()
    if info.st_uid != os.getuid():
        return f"{path} is owned by uid {info.st_uid}, not by us (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if info.st_mode & stat.S_IWOTH else "its group"
        return f"{path} is writable by {who} (mode {stat.filemode(info.st_mode)})"
    return None


def check_trusted(*paths: Path) -> None:
    """Raises ``UnsafeCacheError`` naming the first of ``paths`` (those that exist) another user could write."""
    for path in paths:
        if path.exists():
            reason = unsafe_reason(path)
            if reason is not None:
                raise UnsafeCacheError(reason)


def make_private_directory(directory: Path) -> None:
    """Creates ``directory`` and its missing parents with mode 0700 (whatever the umask)."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # another process made it first: checked by the caller like any folder
            continue
        os.chmod(path, 0o700)  # mkdir's mode is reduced by the umask, never widened


def build_directory(with_cuda: bool) -> Path:
    """Cache directory of the build, e.g. ``~/.cache/ddetr/ops/torch2.14.1-cuda13.0-py311-<hash>``.

    The root is ``$DDETR_BUILD_DIR`` if set, else ``$XDG_CACHE_HOME/ddetr/ops`` (``~/.cache``).
    """
    root = cache_root()
    sources = csrc_dir()
    digest = hashlib.sha256()
    names = _CPU_SOURCES + _HEADERS + (_CUDA_SOURCES if with_cuda else ())
    for name in names:
        digest.update(name.encode())
        digest.update((sources / name).read_bytes())
    digest.update(" ".join(_cxx_flags() + (_CUDA_FLAGS if with_cuda else [])).encode())
    digest.update(f"{_BUILD_RECIPE_VERSION} {_cpu_fingerprint()} {os.environ.get('TORCH_CUDA_ARCH_LIST', '')}".encode())
    device = f"cuda{torch.version.cuda}" if with_cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"torch{torch.__version__.replace('+', '_')}-{device}-{python}-{digest.hexdigest()[:16]}"


def _library_path(directory: Path) -> Path:
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return directory / f"{EXTENSION_NAME}{suffix}"


def build(with_cuda: bool | None = None, verbose: bool = False) -> Path:
    """Compiles (if needed) and loads the library into ``torch.ops.ddetr``; returns its path.

    Args:
        with_cuda: include the CUDA kernels; default: when ``torch.cuda.is_available()``.
        verbose: show the compiler commands and output.
    """
    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    sources = csrc_dir()
    directory = build_directory(with_cuda)
    library = _library_path(directory)
    ready_marker = directory / "ready"
    # a folder or library another user can write may hold their code: neither build into it nor load it
    check_trusted(directory.parent, directory, library, ready_marker)
    if ready_marker.is_file() and library.is_file():
        torch.ops.load_library(str(library))
        return library

    from torch.utils import cpp_extension  # needs a compiler only from here on

    make_private_directory(directory)
    check_trusted(directory.parent, directory)  # created by someone else between the check and here
    print(
        f"ddetr: compiling the deformable attention op ({'CPU+CUDA' if with_cuda else 'CPU'}) into {directory}, "
        "once per torch version and source change (about a minute)...",
        file=sys.stderr,
        flush=True,
    )
    names = _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(sources / name) for name in names],
        extra_cflags=_cxx_flags(),
        extra_cuda_cflags=list(_CUDA_FLAGS),
        extra_ldflags=["-fopenmp"] if sys.platform.startswith("linux") else [],
        extra_include_paths=[str(sources)],
        build_directory=str(directory),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    # atomic: a process that sees the marker sees a complete library
    temporary = directory / f"ready.{os.getpid()}.tmp"
    temporary.write_text(f"{library.name}\n")
    os.replace(temporary, ready_marker)
    return library


@dataclass
class _LoadState:
    attempted: bool = False
    error: str | None = None
    devices: set[str] = field(default_factory=set)  # device types with compiled kernels


_STATE = _LoadState()


def load_library(with_cuda: bool | None = None) -> bool:
    """Builds/loads the library once per process; returns whether it is usable.

    A failure is remembered (see :func:`load_error`) and reported with one warning; callers then use
    the PyTorch path.
    """
    if _STATE.attempted:
        return _STATE.error is None
    _STATE.attempted = True
    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    try:
        build(with_cuda=with_cuda)
    except UnsafeCacheError as error:
        _STATE.error = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"ddetr: not loading the compiled deformable attention op: {error}; using the slower PyTorch path "
            "(make the cache private to you, or set DDETR_BUILD_DIR to a folder of your own)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    except Exception as error:  # noqa: BLE001 - any build failure means: use the fallback
        _STATE.error = _describe(error)
        warnings.warn(
            "ddetr: the compiled deformable attention op is unavailable, using the slower PyTorch path "
            f"(run `python -m ddetr.ops build --verbose` for the full log). Reason: {_STATE.error}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _STATE.devices = {"cpu", "cuda"} if with_cuda else {"cpu"}
    return True


def load_error() -> str | None:
    """Why the compiled library could not be loaded (None if it loaded or was not tried yet)."""
    return _STATE.error


def compiled_devices() -> set[str]:
    """Device types that have compiled kernels in the loaded library."""
    return set(_STATE.devices)


def _describe(error: BaseException, max_chars: int = 1500) -> str:
    """Short reason of a build failure: the exception type and the compiler's error lines with the
    source line each quotes (else the end of the message)."""
    message = str(error).strip()
    lines = message.splitlines()
    errors = [index for index, line in enumerate(lines) if "error:" in line]
    if errors:
        picked: list[str] = []
        for index in errors[:5]:
            picked.extend(line for line in lines[index : index + 3] if line not in picked)
        message = "\n".join(picked)
    if len(message) > max_chars:
        message = "..." + message[-max_chars:]
    return f"{type(error).__name__}: {message}"
