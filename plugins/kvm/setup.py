"""Builds the plugin's cffi module. cffi compiles it against the stable ABI (``Py_LIMITED_API``,
hence ``_native.abi3.so``), so the wheel is tagged ``cp311-abi3``."""

from setuptools import setup

setup(
    cffi_modules=["src/vmmkit_kvm/_native_build.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
