"""Builds the plugin's cffi module against the stable ABI (``_native.abi3.so``), so the wheel is
tagged ``cp311-abi3``."""

from setuptools import setup

setup(
    cffi_modules=["src/vmmkit_mshv/_native_build.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
