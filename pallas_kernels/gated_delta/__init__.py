"""Chunked gated delta rule kernels (Pallas: Triton lowering on GPU, Mosaic on TPU)."""
from pallas_kernels.gated_delta.api import (Config, gated_delta_packed, get_default_config,
                                            set_default_config)

__all__ = ["Config", "gated_delta_packed", "get_default_config", "set_default_config"]
