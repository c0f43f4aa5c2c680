"""The allocator set-up (runtime.py): which allocator MTTLSS_ALLOCATOR chooses, and the re-exec that preloads it."""

from __future__ import annotations

import json
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
    assert plan == {"allocator": "tcmalloc", "library": tcmalloc, "env": {"LD_PRELOAD": tcmalloc}}
    kept = allocator_plan({ENV: "Auto", "LD_PRELOAD": "/opt/other.so"}, both)  # the user's own preloads stay
    assert kept["env"]["LD_PRELOAD"] == f"{tcmalloc} /opt/other.so"
    jemalloc = allocator_plan({}, _libraries(tmp_path / "je", "libjemalloc.so.2"))
    assert jemalloc["allocator"] == "jemalloc" and jemalloc["env"]["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    merged = allocator_plan({"MALLOC_CONF": "narenas:2"}, _libraries(tmp_path / "je", "libjemalloc.so.2"))
    assert merged["env"]["MALLOC_CONF"] == "narenas:2,dirty_decay_ms:-1,muzzy_decay_ms:-1"  # added, not replaced
    assert allocator_plan({}, (str(tmp_path / "none"),)) == {"allocator": "glibc-tuned", "library": None, "env": {}}


@glibc_linux
def test_the_off_switch_and_the_glibc_choice_preload_nothing(tmp_path):
    dirs = _libraries(tmp_path / "lib", "libtcmalloc_minimal.so.4")
    assert allocator_plan({ENV: "SYSTEM"}, dirs) == {"allocator": "system", "library": None, "env": {}}
    assert allocator_plan({ENV: "glibc"}, dirs) == {"allocator": "glibc-tuned", "library": None, "env": {}}


@glibc_linux
def test_a_choice_that_names_nothing_usable_is_one_sentence_with_the_fix(tmp_path):
    with pytest.raises(AllocatorChoiceError, match="auto, tcmalloc, jemalloc, glibc, system"):
        allocator_plan({ENV: "mimalloc"})
    with pytest.raises(AllocatorChoiceError, match="apt install libtcmalloc-minimal4"):
        allocator_plan({ENV: "tcmalloc"}, (str(tmp_path / "none"),))
    with pytest.raises(AllocatorChoiceError, match="no such file"):
        allocator_plan({ENV: str(tmp_path / "libmissing.so")})
    with pytest.raises(AllocatorChoiceError, match="space or a colon"):
        allocator_plan({ENV: str(_libraries(tmp_path / "a b", "libjemalloc.so.2")[0] + "/libjemalloc.so.2")})
    # a path to a known allocator gets its name and settings
    je = _libraries(tmp_path / "mine", "libjemalloc.so.2")[0] + "/libjemalloc.so.2"
    assert allocator_plan({ENV: je}) == {"allocator": "jemalloc", "library": je, "env": {
        "LD_PRELOAD": je, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}}


def _harmless_library(tmp_path: Path) -> Path:
    """A copy of the C maths library under a new name: preloading it changes nothing but shows in the maps."""
    found = [os.path.join(d, "libm.so.6") for d in runtime.LIBRARY_DIRS if os.path.isfile(os.path.join(d, "libm.so.6"))]
    if not found:
        pytest.skip("no libm.so.6 in the usual folders")
    copy = tmp_path / "libpreloadcheck.so"
    shutil.copy(found[0], copy)
    return copy


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (PRELOADED_ENV, "LD_PRELOAD", "MALLOC_CONF", ENV)}
    return {**env, **extra}


PROBE = """
import json, os, sys
from mttlss import runtime
runtime.exec_with_allocator()
print(json.dumps({"argv": sys.argv[1:], "status": runtime.tune_allocator(), "pid": os.getpid(),
                  "env": {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF", runtime.PRELOADED_ENV)}}))
"""


@glibc_linux
def test_the_command_reexecutes_itself_once_with_the_allocator_and_gives_the_environment_back(tmp_path):
    lib = _harmless_library(tmp_path)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = subprocess.run([sys.executable, str(probe), "an-argument"], capture_output=True, text=True, timeout=60,
                         env=_clean_env(**{ENV: str(lib), "MALLOC_CONF": "narenas:2"}))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1, lines  # the first process was replaced; the second did not exec again
    seen = json.loads(lines[0])
    assert seen["argv"] == ["an-argument"]
    assert seen["status"] == {"allocator": "libpreloadcheck.so", "library": str(lib), "why": "preloaded"}  # mapped
    # what child processes would inherit: the user's own settings, not the preload
    assert seen["env"] == {"LD_PRELOAD": None, "MALLOC_CONF": "narenas:2", PRELOADED_ENV: None}


@glibc_linux
def test_a_library_that_cannot_be_preloaded_falls_back_to_the_glibc_setting_and_says_so(tmp_path):
    fake = tmp_path / "libfake.so"
    fake.write_text("not a shared library")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60,
                         env=_clean_env(**{ENV: str(fake)}))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout.splitlines()[-1])["status"]
    assert status["allocator"] == "glibc-tuned" and f"{fake} could not be preloaded" in status["why"]


@glibc_linux
def test_a_host_that_runs_mttlss_inside_itself_is_not_reexecuted(tmp_path):
    """runpy, a notebook or a test calling the entry: re-running the interpreter's command line would restart the
    host, so nothing is preloaded there."""
    host = tmp_path / "host.py"
    host.write_text("import sys\nprint('host starting', flush=True)\nsys.argv = ['mttlss', 'an-argument']\n"
                    "from mttlss import runtime\nprint(runtime.launched_as_command())\nruntime.exec_with_allocator()\n"
                    "print('host done')\n")
    out = subprocess.run([sys.executable, str(host)], capture_output=True, text=True, timeout=60,
                         env=_clean_env(**{ENV: str(_harmless_library(tmp_path))}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["host starting", "False", "host done"]


def test_only_the_command_line_is_recognised_as_the_command(monkeypatch):
    for orig, argv, expected in (
            (["python", "-m", "mttlss", "distill", "x"], ["/src/mttlss/__main__.py", "distill", "x"], True),
            (["python", "-u", "-m", "mttlss", "distill"], ["/src/mttlss/__main__.py", "distill"], True),  # torchrun
            (["/venv/bin/python", "/venv/bin/mttlss", "presets"], ["/venv/bin/mttlss", "presets"], True),
            (["python", "-c", "code", "presets"], ["-c", "presets"], False),
            (["python", "host.py"], ["mttlss", "presets"], False),
            (["python", "-m", "ipykernel_launcher", "-f", "k.json"], ["/x/ipykernel_launcher.py", "-f", "k.json"], False)):
        monkeypatch.setattr(sys, "orig_argv", orig)
        monkeypatch.setattr(sys, "argv", argv)
        assert runtime.launched_as_command() is expected, orig


def test_in_process_calls_never_exec(monkeypatch, capsys):
    """cli.main and the launcher's main, as the tests and the Python API call them, must not replace the process."""
    from mttlss import __main__ as launcher
    from mttlss import cli

    def refuse(*args):
        raise AssertionError(f"exec called: {args}")

    monkeypatch.setattr(os, "execv", refuse)
    monkeypatch.setenv(ENV, "auto")
    assert cli.main(["presets"]) == 0
    assert launcher.main(["presets"]) == 0
    assert "cifar10_ipc1_lowrank" in capsys.readouterr().out


@glibc_linux
def test_a_failing_exec_leaves_the_environment_as_it_was(monkeypatch, tmp_path):
    lib = tmp_path / "libmine.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv(ENV, str(lib))
    monkeypatch.setenv("LD_PRELOAD", "/opt/users-own.so")
    monkeypatch.delenv(PRELOADED_ENV, raising=False)
    monkeypatch.setattr(runtime, "launched_as_command", lambda: True)
    calls = []

    def failing_exec(path, args):
        calls.append(os.environ["LD_PRELOAD"])
        raise OSError("exec refused")

    monkeypatch.setattr(os, "execv", failing_exec)
    runtime.exec_with_allocator()
    assert calls == [f"{lib} /opt/users-own.so"]  # it was tried with the library first
    assert os.environ["LD_PRELOAD"] == "/opt/users-own.so" and PRELOADED_ENV not in os.environ


def test_elsewhere_than_glibc_linux_nothing_is_preloaded_but_the_value_is_still_checked(monkeypatch):
    monkeypatch.setattr(runtime, "_is_glibc_linux", lambda: False)
    assert allocator_plan({ENV: "tcmalloc"}) == {"allocator": "system", "library": None, "env": {}}
    with pytest.raises(AllocatorChoiceError):
        allocator_plan({ENV: "fastest"})


@glibc_linux
def test_the_command_line_runs_the_same_command_after_the_reexec_and_refuses_a_bad_choice(tmp_path):
    preloaded = subprocess.run([sys.executable, "-m", "mttlss", "presets"], capture_output=True, text=True,
                               env=_clean_env(**{ENV: str(_harmless_library(tmp_path))}), timeout=120)
    assert preloaded.returncode == 0 and "cifar10_ipc1_lowrank" in preloaded.stdout, preloaded.stderr
    bad = subprocess.run([sys.executable, "-m", "mttlss", "presets"], capture_output=True, text=True,
                         env=_clean_env(**{ENV: "Fastest"}), timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "MTTLSS_ALLOCATOR='Fastest' is not an allocator choice" in bad.stderr and "Traceback" not in bad.stderr


def test_native_bf16_flag_reads_the_first_flags_line_and_prefers_amx():
    flags = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\nbogomips\t: 5192\n"
    assert runtime.native_bf16_flag(flags.format("avx512_bf16 amx_bf16 amx_tile")) == "amx_bf16"
    assert runtime.native_bf16_flag(flags.format("avx512_bf16 avx512_vnni")) == "avx512_bf16"  # AMD Zen 4
    assert runtime.native_bf16_flag(flags.format("avx512_vnni")) is None                       # AMD Zen 3 and older
    assert runtime.native_bf16_flag("Features\t: fp asimd bf16\n") is None                    # not an x86 flags line
