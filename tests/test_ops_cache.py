"""The compiled op's cache is trusted only when it is private: folders are created 0700, and a folder
or library another user could write (group/world writable, or not ours) is neither built into nor
loaded; the op then warns once and uses the PyTorch path, as after a failed build."""

from __future__ import annotations

import os
import shutil
import stat
import warnings

import pytest
import torch

from ddetr import ops
from ddetr.ops import _build, ms_deform_attn, ms_deform_attn_pytorch

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_folders_are_created_private_whatever_the_umask(tmp_path):
    target = tmp_path / "home" / "cache" / "ops" / "build"
    previous = os.umask(0)  # mkdir's default would give 0777
    try:
        _build.make_private_directory(target)
    finally:
        os.umask(previous)
    for path in (target, *list(target.parents)[:3]):
        assert mode(path) == 0o700, (path, oct(mode(path)))
    _build.make_private_directory(target)  # existing folders are fine


def test_unsafe_reason_reads_owner_and_mode(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    os.chmod(path, 0o644)
    assert _build.unsafe_reason(path) is None
    os.chmod(path, 0o664)
    assert "writable by its group" in _build.unsafe_reason(path)
    os.chmod(path, 0o646)
    assert "writable by others" in _build.unsafe_reason(path)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache under tmp_path holding the real CPU library (a hard link: loading it again is a no-op for
    the dynamic loader), marked ready; the load state is fresh. Returns (build folder, library path,
    the real library)."""
    assert ops.compiled_op_available("cpu"), _build.load_error()
    built = _build.build_directory(with_cuda=False)
    monkeypatch.setenv("DDETR_BUILD_DIR", str(tmp_path / "cache"))
    directory = _build.build_directory(with_cuda=False)
    _build.make_private_directory(directory)
    library = _build._library_path(directory)
    os.link(_build._library_path(built), library)
    (directory / "ready").write_text(f"{library.name}\n")
    monkeypatch.setattr(_build, "_STATE", _build._LoadState())
    return directory, library, _build._library_path(built)


def test_a_private_cache_is_loaded(private_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _build.load_library(with_cuda=False), _build.load_error()


def inputs():
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(1, 26, 2, 4, generator=generator)
    shapes, starts = torch.tensor([[4, 5], [2, 3]]), torch.tensor([0, 20])
    locations = torch.rand(1, 3, 2, 2, 2, 2, generator=generator)
    weights = torch.rand(1, 3, 2, 2, 2, generator=generator)
    return value, shapes, starts, locations, weights


def make_unsafe(fault: str, directory, library, source) -> str:
    """Applies ``fault``; returns the path and reason the warning must name."""
    if fault == "library_not_ours":
        # a copy, so the shared library keeps its owner
        library.unlink()
        shutil.copy2(source, library)
        os.chown(library, 65534, 65534)
        return f"{library} is owned by uid 65534"
    if fault == "library_world_writable":
        library.unlink()
        shutil.copy2(source, library)
        os.chmod(library, 0o757)
        return f"{library} is writable by others"
    if fault == "build_folder_group_writable":
        os.chmod(directory, 0o770)
        return f"{directory} is writable by its group"
    if fault == "cache_root_not_ours":
        os.chown(directory.parent, 65534, 65534)
        return f"{directory.parent} is owned by uid 65534"
    raise ValueError(fault)


@pytest.mark.parametrize(
    "fault", ["library_not_ours", "library_world_writable", "build_folder_group_writable", "cache_root_not_ours"]
)
def test_an_unsafe_cache_is_refused_with_one_warning(fault, private_cache):
    directory, library, source = private_cache
    if "not_ours" in fault and os.getuid() != 0:
        pytest.skip("changing a file's owner needs root")
    expected = make_unsafe(fault, directory, library, source)
    loaded_before = set(torch.ops.loaded_libraries)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [ms_deform_attn(*inputs()) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "not loading the compiled deformable attention op" in messages[0] and expected in messages[0]
    assert "\n" not in messages[0]
    assert set(torch.ops.loaded_libraries) == loaded_before  # nothing loaded from the unsafe cache
    for output in outputs:
        torch.testing.assert_close(output, ms_deform_attn_pytorch(*inputs()), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="UnsafeCacheError"):
        ms_deform_attn(*inputs(), backend="cpu")
