"""The built wheel carries what a user installing clara-edge needs besides code: the shipped weights, the demo
corpus, the training recipes and the licence files (package data is easy to lose in a pyproject edit)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _source_files() -> list[Path]:
    """The checkout's files as a fresh clone would have them (tracked, or new and not ignored)."""
    listing = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
                             capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    return [Path(f) for f in listing.stdout.splitlines() if (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    # Built from a copy: setuptools reuses the build/ and *.egg-info an editable install leaves in the
    # checkout, whose file lists would hide a file the configuration no longer ships.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for f in _source_files():
        (source / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, source / f)
    # No build isolation: the environment's setuptools builds it, so the test needs no network.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(out), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("clara_edge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


@pytest.mark.parametrize(("folder", "package"), [("edge/weights", "clara_edge/weights"),
                                                 ("edge/demo_corpus", "clara_edge/demo_corpus"),
                                                 ("export/recipes", "clara_edge/export/recipes")])
def test_wheel_carries_every_data_file(wheel_names, folder, package):
    files = [f for f in _source_files() if f.is_relative_to(folder)]
    assert files, f"nothing under {folder}"
    missing = [str(f) for f in files if f"{package}/{f.relative_to(folder).as_posix()}" not in wheel_names]
    assert not missing, f"not in the wheel: {missing}"


def test_wheel_carries_the_licence(wheel_names):
    licences = {Path(n).name for n in wheel_names if ".dist-info/licenses/" in n}
    assert {"LICENSE", "NOTICE"} <= licences
