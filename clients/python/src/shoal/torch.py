"""The PyTorch adapter: a module's ``state_dict`` <-> the manifest's tensors as numpy arrays.

Optional: install with ``pip install shoal-fl[torch]``; importing this module without PyTorch
raises ``ImportError`` with that hint. Tensors are moved to the CPU; ``bfloat16`` travels
bit-exactly through ``ml_dtypes.bfloat16``; integer buffers (BatchNorm's
``num_batches_tracked``) stay integers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised where torch is absent
    raise ImportError("shoal.torch needs PyTorch: pip install 'shoal-fl[torch]'") from e

from .messages import TensorSpec
from .tensors import NUMPY_DTYPES, Params, TensorMismatch


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as a numpy array (CPU copy; ``bfloat16`` as ``ml_dtypes.bfloat16``)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(NUMPY_DTYPES["BF16"]).copy()
    return t.contiguous().numpy().copy()


def numpy_to_tensor(a: np.ndarray) -> Any:
    """A numpy array as a torch tensor (``ml_dtypes.bfloat16`` as ``torch.bfloat16``)."""
    if a.dtype == NUMPY_DTYPES["BF16"]:
        return torch.from_numpy(np.array(a, order="C", copy=True).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, order="C", copy=True))


def state_dict_to_params(state: Mapping[str, Any], tensors: Sequence[TensorSpec] | None = None) -> Params:
    """A ``state_dict`` as numpy arrays; with a manifest's ``tensors``, exactly its tensors in its
    order (a missing or extra entry raises :class:`~shoal.tensors.TensorMismatch`)."""
    if tensors is None:
        return {k: tensor_to_numpy(v) for k, v in state.items()}
    names = {t.name for t in tensors}
    extra = sorted(set(state) - names)
    if extra:
        raise TensorMismatch(f"state_dict entries not in the manifest: {extra}")
    missing = [t.name for t in tensors if t.name not in state]
    if missing:
        raise TensorMismatch(f"manifest tensors missing from the state_dict: {missing}")
    return {t.name: tensor_to_numpy(state[t.name]) for t in tensors}


def load_params(module: Any, params: Mapping[str, np.ndarray]) -> None:
    """Copies ``params`` into ``module`` (``load_state_dict``, strict), casting each to the dtype
    and device of the module's own tensor."""
    own = module.state_dict()
    new = {}
    for name, value in params.items():
        if name not in own:
            raise TensorMismatch(f"tensor {name!r} is not in the module's state_dict")
        ref = own[name]
        new[name] = numpy_to_tensor(np.asarray(value)).to(dtype=ref.dtype, device=ref.device)
    module.load_state_dict(new, strict=True)


class TorchModel:
    """A ``torch.nn.Module`` seen as the manifest's tensors (what :func:`shoal.train_rounds` uses)."""

    def __init__(self, module: Any):
        self.module = module

    def get(self, tensors: Sequence[TensorSpec]) -> Params:
        """The module's current tensors."""
        return state_dict_to_params(self.module.state_dict(), tensors)

    def set(self, params: Mapping[str, np.ndarray]) -> None:
        """Loads ``params`` into the module."""
        load_params(self.module, params)


def is_module(obj: object) -> bool:
    """Whether ``obj`` is a ``torch.nn.Module``."""
    return isinstance(obj, torch.nn.Module)
