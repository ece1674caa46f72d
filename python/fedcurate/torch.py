"""Optional helpers between torch modules and the numpy tensors fedcurate exchanges (torch is
not a dependency of the package; import this module only where torch is installed)."""

import numpy as np
import torch


def from_module(module):
    """The module's floating-point parameters and buffers as numpy float32 arrays."""
    return {k: v.detach().cpu().numpy().astype(np.float32)
            for k, v in module.state_dict().items() if v.is_floating_point()}


def to_state_dict(weights, device="cpu"):
    """Tensors for ``module.load_state_dict(..., strict=False)``."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in weights.items()}
