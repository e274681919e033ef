"""The one compiled part: charrnn.infer._rows (charrnn/infer/_rows.c), the server's batch-invariant
row products. It is optional: without a C compiler (or Python's headers) the install goes
on without it and `charrnn serve` uses torch's matmul at a 4-row minimum width, as before
(charrnn/infer/rows.py). Everything else is in pyproject.toml."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        unix = self.compiler.compiler_type != "msvc"
        for ext in self.extensions:
            # -ffp-contract=off: a product is rounded before its add, as the kernel promises
            ext.extra_compile_args = ["-O3", "-ffp-contract=off"] if unix else ["/O2", "/fp:precise"]
        super().build_extensions()


setup(ext_modules=[Extension("charrnn.infer._rows", ["charrnn/infer/_rows.c"], optional=True)],
      cmdclass={"build_ext": BuildExt})
