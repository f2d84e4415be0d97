"""setuptools glue: the metadata is in setup.cfg. The repository root is the package `cosegment` (`package_dir =
cosegment = .`), so without this every top-level module would ship, including pytest's root `conftest.py`."""

from setuptools import setup
from setuptools.command.build_py import build_py

NOT_SHIPPED = {("cosegment", "conftest"), ("cosegment", "setup")}


class BuildPy(build_py):
    """`build_py` that leaves the repository's tooling modules out of the wheel."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [module for module in modules if (module[0], module[1]) not in NOT_SHIPPED]


setup(cmdclass={"build_py": BuildPy})
