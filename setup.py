"""Build nslab and its cffi extensions (API mode, out of line; C sources in csrc/)."""
from setuptools import find_packages, setup

setup(
    name="nslab",
    version="0.1.0",
    description="A laboratory for Linux network namespaces: Docker's network modes, from the syscalls up",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["nslab", "nslab.*"]),
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "pyroute2>=0.9", "psutil>=5.9"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    cffi_modules=["nslab/_ffi_build.py:ffi", "nslab/_probe_build.py:ffi"],
    entry_points={"console_scripts": ["nslab=nslab.cli:main"]},
    zip_safe=False,
)
