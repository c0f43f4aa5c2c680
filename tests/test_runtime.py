"""The allocator set-up (runtime.py): which allocator MTTLSS_ALLOCATOR chooses, and the re-exec that preloads it."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mttlss import runtime
from mttlss.runtime import ENV, PRELOADED_ENV, AllocatorChoiceError, allocator_plan, find_allocator_library

glibc_linux = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="preloading an allocator is done on glibc Linux only")


def _libraries(folder: Path, *names: str) -> tuple[str, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"\x7fELF")  # only looked for, never loaded, in these tests
    return (str(folder),)


def test_the_library_is_found_by_its_first_known_name(tmp_path):
    dirs = _libraries(tmp_path / "lib", "libtcmalloc.so.4", "libjemalloc.so.2")
    assert find_allocator_library("tcmalloc", dirs) == str(tmp_path / "lib" / "libtcmalloc.so.4")
    _libraries(tmp_path / "lib", "libtcmalloc_minimal.so.4")  # the minimal build is preferred
    assert find_allocator_library("tcmalloc", dirs) == str(tmp_path / "lib" / "libtcmalloc_minimal.so.4")
    assert find_allocator_library("jemalloc", (str(tmp_path / "empty"),)) is None


@glibc_linux
def test_auto_prefers_tcmalloc_then_jemalloc_then_the_glibc_setting(tmp_path):
    both = _libraries(tmp_path / "both", "libtcmalloc_minimal.so.4", "libjemalloc.so.2")
    plan = allocator_plan({}, both)
    tcmalloc = str(tmp_path / "both" / "libtcmalloc_minimal.so.4")
    assert plan["allocator"] == "tcmalloc" and plan["env"] == {"LD_PRELOAD": tcmalloc, PRELOADED_ENV: f"tcmalloc={tcmalloc}"}
    kept = allocator_plan({ENV: "auto", "LD_PRELOAD": "/opt/other.so"}, both)  # the user's own preloads stay
    assert kept["env"]["LD_PRELOAD"] == f"{tcmalloc} /opt/other.so"
    jemalloc = allocator_plan({}, _libraries(tmp_path / "je", "libjemalloc.so.2"))
    assert jemalloc["allocator"] == "jemalloc" and jemalloc["env"]["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert allocator_plan({}, (str(tmp_path / "none"),)) == {"allocator": "glibc-tuned", "library": None, "env": {}}


@glibc_linux
def test_the_off_switch_the_glibc_choice_and_an_already_preloaded_process_exec_nothing(tmp_path):
    dirs = _libraries(tmp_path / "lib", "libtcmalloc_minimal.so.4")
    assert allocator_plan({ENV: "system"}, dirs) == {"allocator": "system", "library": None, "env": {}}
    assert allocator_plan({ENV: "glibc"}, dirs)["env"] == {}
    again = allocator_plan({PRELOADED_ENV: "tcmalloc=/usr/lib/libtcmalloc_minimal.so.4"}, dirs)
    assert again == {"allocator": "tcmalloc", "library": "/usr/lib/libtcmalloc_minimal.so.4", "env": {}}


@glibc_linux
def test_a_choice_that_names_nothing_usable_is_one_sentence_with_the_fix(tmp_path):
    with pytest.raises(AllocatorChoiceError, match="auto, tcmalloc, jemalloc, glibc, system"):
        allocator_plan({ENV: "mimalloc"})
    with pytest.raises(AllocatorChoiceError, match="apt install libtcmalloc-minimal4"):
        allocator_plan({ENV: "tcmalloc"}, (str(tmp_path / "none"),))
    with pytest.raises(AllocatorChoiceError, match="no such file"):
        allocator_plan({ENV: str(tmp_path / "libmissing.so")})
    lib = tmp_path / "libmine.so"
    lib.write_bytes(b"\x7fELF")
    assert allocator_plan({ENV: str(lib)})["env"]["LD_PRELOAD"] == str(lib)


def _harmless_library(tmp_path: Path) -> Path:
    """A copy of the C maths library under a new name: preloading it changes nothing but shows in the maps."""
    found = [p for d in runtime.LIBRARY_DIRS for p in glob.glob(os.path.join(d, "libm.so.6"))]
    if not found:
        pytest.skip("no libm.so.6 in the usual folders")
    copy = tmp_path / "libpreloadcheck.so"
    shutil.copy(found[0], copy)
    return copy


@glibc_linux
def test_the_process_reexecutes_itself_once_with_the_allocator_preloaded(tmp_path):
    lib = _harmless_library(tmp_path)
    script = ("import os, sys; from mttlss.runtime import exec_with_allocator; exec_with_allocator(); "
              "print(os.environ['" + PRELOADED_ENV + "'], sys.argv[1:], os.environ['LD_PRELOAD'] in "
              "open('/proc/self/maps').read())")
    env = {**os.environ, ENV: str(lib)}
    env.pop(PRELOADED_ENV, None)
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", script, "an-argument"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    # one line: the first process was replaced, and the second did not exec again; its arguments are the same
    assert out.stdout.splitlines() == [f"libpreloadcheck.so={lib} ['an-argument'] True"]


@glibc_linux
def test_the_command_line_runs_the_same_command_after_the_reexec_and_refuses_a_bad_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (PRELOADED_ENV, "LD_PRELOAD", ENV)}
    plain = subprocess.run([sys.executable, "-m", "mttlss", "presets"], capture_output=True, text=True, env=env,
                           timeout=120)
    preloaded = subprocess.run([sys.executable, "-m", "mttlss", "presets"], capture_output=True, text=True,
                               env={**env, ENV: str(_harmless_library(tmp_path))}, timeout=120)
    assert plain.returncode == 0 and preloaded.returncode == 0, preloaded.stderr
    assert preloaded.stdout == plain.stdout and "cifar10" in plain.stdout
    bad = subprocess.run([sys.executable, "-m", "mttlss", "presets"], capture_output=True, text=True,
                         env={**env, ENV: "fastest"}, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "MTTLSS_ALLOCATOR='fastest' is not an allocator choice" in bad.stderr and "Traceback" not in bad.stderr
