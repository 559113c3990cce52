from setuptools import setup

setup(cffi_modules=["src/vmmkit_kvm/_native_build.py:ffibuilder"])
