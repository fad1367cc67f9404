"""fastnote.patch / unpatch (see ``engine``)."""
from .engine import *  # noqa: F401,F403
from .engine import KINDS, Left, PatchReport, Replaced, patch, unpatch  # noqa: F401
