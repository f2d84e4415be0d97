"""pytest configuration at the repository root.

The repository root is the package `cosegment` (`package_dir = cosegment = .`), so it holds an `__init__.py` with
relative imports, and pytest imports that file before running the tests (package-level setup). In a checkout whose
folder is not a valid module name (`wt-hard`, `cosegment-main`) pytest imports it as a top-level module `__init__`,
which fails every test with "attempted relative import with no known parent package". Registering the installed (or
`PYTHONPATH`) package under that name lets pytest find the module it wants: the same file, imported as a package.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))

if not os.path.basename(_ROOT).isidentifier():
    import cosegment

    if os.path.samefile(os.path.dirname(cosegment.__file__), _ROOT):
        sys.modules.setdefault("__init__", cosegment)
