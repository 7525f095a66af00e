"""The transformers adapter: a ``Cache`` subclass over the engine-agnostic core, the
"sawquant" attention function, and ``patch`` / ``unpatch`` / ``from_pretrained``."""

from sawquant.runtime.hf.cache import SawquantCache
from sawquant.runtime.hf.patch import from_pretrained, is_patched, patch, unpatch

__all__ = ["SawquantCache", "from_pretrained", "is_patched", "patch", "unpatch"]
