"""Shared by the test_sdk_*.py files: imports the built `lm2` module from
LM2_PYTHON_MODULE_DIR (set by the `python_sdk` ctest entry), or skips the module with the
reason when it is not set (e.g. under the plain `python_reference` run of tests/python)."""
import os
import sys

import pytest

MODULE_DIR = os.environ.get("LM2_PYTHON_MODULE_DIR")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "data", "models", "tiny-lm2")


def import_lm2():
    if not MODULE_DIR:
        pytest.skip("LM2_PYTHON_MODULE_DIR is not set: the SDK's Python tests run as ctest 'python_sdk'",
                    allow_module_level=True)
    sys.path.insert(0, MODULE_DIR)
    import lm2  # noqa: E402
    return lm2


def open_engine(lm2, tmp_path, **kw):
    keys = str(tmp_path / "master.key")
    lm2.create_key_file(keys)
    kw.setdefault("model_dir", TINY)
    return lm2.Engine(kw.pop("model_dir"), str(tmp_path / "store"), key_file=keys, key_env="", sync_commits=False, **kw)
