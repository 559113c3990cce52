from setuptools import setup

setup(cffi_modules=["src/vmmkit_devices/virtio/_native_build.py:ffibuilder"])
