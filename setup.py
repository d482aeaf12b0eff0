"""The one thing pyproject.toml cannot say: the optional compiled module.

``mktme_emu._blockxor`` (emulator/_blockxor.c) speeds up the XTS engine's
per-block masking; it is optional because crypto.py falls back to numpy when
it is missing (no compiler), so a failed build is a warning, not an error.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mktme_emu._blockxor", ["emulator/_blockxor.c"],
                             extra_compile_args=["-O3"], optional=True)])
