"""transformers' own model test suites, taken from the source distribution of the installed version.

The wheel ships no ``tests/``. The sdist ships ``tests/test_modeling_common.py`` and its siblings but not
the modules they import from ``tests/generation/``, ``tests/exporters/`` and ``tests/utils/``; those come
from ``suite_shims/`` (each says what it stands in for). The suites are unpacked once per transformers
version into a cache folder and imported from there as the package ``transformers_tests``.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

SUITES = ("test_modeling_common.py", "test_configuration_common.py", "test_pipeline_mixin.py", "test_training_mixin.py")
SHIMS = Path(__file__).parent / "suite_shims"
CACHE = Path(os.environ.get("LONGNET_TEST_CACHE", Path.home() / ".cache" / "longnet-tests"))


def suite_folder(version: str = transformers.__version__) -> Path:
    """The folder holding ``transformers_tests/`` for ``version``, downloaded and unpacked on first use."""
    folder = CACHE / f"transformers-{version}"
    if not (folder / "transformers_tests" / "__init__.py").exists():
        unpack(version, folder)
    return folder


def unpack(version: str, folder: Path) -> None:
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", f"transformers=={version}"]
        command += ["--no-deps", "--no-binary", ":all:", "--quiet", "--dest", download]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"transformers' test suites come from its source distribution, and `{' '.join(command)}` "
                f"failed (the package registry must be reachable once; the result is cached in {CACHE}):\n"
                f"{result.stderr[-2000:]}"
            )
        (sdist,) = Path(download).glob("transformers-*.tar.gz")
        staging = Path(download) / "tree"
        package = staging / "transformers_tests"
        shutil.copytree(SHIMS, package, ignore=shutil.ignore_patterns("__pycache__"))
        with tarfile.open(sdist) as archive:
            for name in SUITES:
                member = archive.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/tests/{name}")
                (package / name).write_bytes(member.read())
        for subpackage in [package, *(path for path in package.iterdir() if path.is_dir())]:
            (subpackage / "__init__.py").touch()
        # test_pipeline_mixin.py reads the list of the Hub's tiny test checkpoints from tests/utils/ (none of
        # them is LongNet) and imports transformers from src/ beside tests/: an empty module there hands it
        # the installed transformers.
        (staging / "tests" / "utils").mkdir(parents=True)
        (staging / "tests" / "utils" / "tiny_model_summary.json").write_text("{}")
        (staging / "src" / "transformers").mkdir(parents=True)
        (staging / "src" / "transformers" / "__init__.py").touch()
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, folder)
