"""Model families behind one interface (see ``base.DiffusionBackend``)."""

from .base import Conditioning, DiffusionBackend, LoraSettings, PipelineBackend, select_rows
from .flux import FluxBackend, TinyFluxBackend
from .sd3 import SD3Backend, TinySD3Backend
from .sd15 import SD15Backend, TinySD15Backend
from .qwenimage import QwenImageBackend, TinyQwenImageBackend
from .sdxl import SDXLBackend, TinySDXLBackend
from .zimage import TinyZImageBackend, ZImageBackend

__all__ = ["Conditioning", "DiffusionBackend", "LoraSettings", "PipelineBackend", "select_rows"]
__all__ += ["FluxBackend", "SD3Backend", "TinyFluxBackend", "TinySD3Backend"]
__all__ += ["SD15Backend", "TinySD15Backend", "SDXLBackend", "TinySDXLBackend"]
__all__ += ["QwenImageBackend", "TinyQwenImageBackend", "TinyZImageBackend", "ZImageBackend"]
