"""EntroAD (spec ``entroad.md``): structural-entropy-guided prompt adaptation with an MRAD-style memory.

Modules: ``config`` (EntroADConfig), ``entropy`` (patch structural entropies), ``routing`` (retrieval, routing
weights, gate), ``memory`` (memory build, disk cache, checkpointed buffers), ``model`` (EntroAD).
"""

from zsad.methods.entroad.config import EntroADConfig
from zsad.methods.entroad.model import EntroAD

__all__ = ["EntroAD", "EntroADConfig"]
