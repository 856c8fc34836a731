"""weightweave: out-of-core model merging and Weight Weaving for safetensors checkpoints.

The heavy lifting happens in a Rust core (``weightweave._rust``); this package holds the API,
the CLI and a pure-torch reference implementation used as test oracle and benchmark baseline.
"""

from ._rust import (
    CancelledError,
    HeaderError,
    MismatchError,
    NonFiniteError,
    OutputError,
    ParamError,
    WeaveError,
    WeaveIOError,
    __version__,
)
from .api import (
    MERGEKIT_ONLY,
    METHODS,
    POOLS,
    SVD_METHODS,
    AlignedNamesWarning,
    CopiedTensorsWarning,
    KeptBaseWarning,
    Report,
    default_lambdas,
    inspect,
    merge,
    merge_arrays,
    weave,
    weave_arrays,
)
from .recipe import RecipeError, RecipeWarning, run

__all__ = [
    "AlignedNamesWarning",
    "MERGEKIT_ONLY",
    "METHODS",
    "POOLS",
    "SVD_METHODS",
    "CancelledError",
    "CopiedTensorsWarning",
    "HeaderError",
    "KeptBaseWarning",
    "MismatchError",
    "NonFiniteError",
    "OutputError",
    "ParamError",
    "RecipeError",
    "RecipeWarning",
    "Report",
    "WeaveError",
    "WeaveIOError",
    "__version__",
    "default_lambdas",
    "inspect",
    "merge",
    "merge_arrays",
    "run",
    "weave",
    "weave_arrays",
]
