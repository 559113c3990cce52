from setuptools import setup

setup(cffi_modules=["src/vmmkit_mshv/_native_build.py:ffibuilder"])
