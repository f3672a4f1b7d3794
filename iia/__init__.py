"""iia: a deployment compiler for fast diffusion sampling (Improved Integration Approximation).

The subpackages live at the top of the source tree (`models/`, `calibration/`, `compiler/`, `runtime/`,
`evaluation/`) and are mapped into `iia` by pyproject.toml's `package-dir`. In a source checkout that is not
installed (or a second checkout beside an installed one), the same mapping is made here, so that
`python -c "import iia.calibration"` from the checkout's root imports THIS checkout's code.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_top = _Path(__file__).resolve().parent.parent
if (_top / "pyproject.toml").is_file() and (_top / "calibration" / "__init__.py").is_file():
    __path__.append(str(_top))  # noqa: F821 -- the package's own search path
del _Path, _top
