"""``train_rounds``: join a job, and for each round fetch the global model, train on local data,
publish the update and wait for the round's outcome.

The model is either a ``torch.nn.Module`` (trained in place) or a ``dict[str, numpy.ndarray]``
(replaced in place by the global model at the start of each round, and read back after
training). ``train(model)`` runs the local training and returns the number of examples it used
(the update's weight).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, MutableMapping, Protocol, Sequence

import numpy as np

from .client import RoundResult, ShoalClient
from .errors import JobEnded
from .messages import TensorSpec
from .tensors import Params, delta

log = logging.getLogger("shoal")


class ModelAdapter(Protocol):
    """How :func:`train_rounds` reads and writes a model's tensors."""

    def get(self, tensors: Sequence[TensorSpec]) -> Params:
        """The model's tensors, for the manifest's ``tensors``."""
        ...

    def set(self, params: Params) -> None:
        """Replaces the model's tensors."""
        ...


class NumpyModel:
    """A ``dict[str, numpy.ndarray]`` seen as a model: :meth:`set` replaces its content in place
    (copies, so training may modify the arrays), :meth:`get` reads it."""

    def __init__(self, params: MutableMapping[str, np.ndarray]):
        self.params = params

    def get(self, tensors: Sequence[TensorSpec]) -> Params:
        """The dict's arrays for the manifest's tensors."""
        return {t.name: np.asarray(self.params[t.name]) for t in tensors}

    def set(self, params: Params) -> None:
        """Replaces the dict's content with copies of ``params``."""
        self.params.clear()
        self.params.update({k: np.array(v, copy=True) for k, v in params.items()})


def adapter(model: Any) -> ModelAdapter:
    """The adapter for ``model``: a torch module, a dict of numpy arrays, or an adapter already."""
    if hasattr(model, "get") and hasattr(model, "set") and not isinstance(model, dict):
        return model  # type: ignore[no-any-return]
    if isinstance(model, MutableMapping):
        return NumpyModel(model)
    try:
        from .torch import TorchModel, is_module
    except ImportError:
        is_module = None  # type: ignore[assignment]
    if is_module is not None and is_module(model):
        return TorchModel(model)
    raise TypeError(f"cannot train a {type(model).__name__}: pass a torch.nn.Module or a dict of numpy arrays")


async def train_rounds_async(
    client: ShoalClient,
    job: str,
    model: Any,
    train: Callable[[Any], int],
    rounds: int,
    *,
    round_timeout: float | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
) -> list[RoundResult]:
    """The loop of :func:`train_rounds` over an open :class:`ShoalClient`."""
    spec = await client.job_spec(job)
    m = adapter(model)
    results: list[RoundResult] = []
    next_round: int | None = None
    for _ in range(rounds):
        try:
            state = await client.wait_for_open_round(job, next_round, timeout=round_timeout)
        except JobEnded as e:
            log.info("job %s ended (%s) after %d rounds", job, e.state.phase, len(results))
            break
        base = await client.fetch_model(job, state.model_version)
        m.set(base)
        num_examples = int(train(model))
        params = m.get(spec.tensors)
        if spec.update_kind == "delta":
            params = delta(params, base, spec.tensors)
        await client.publish_update(job, state.round, state.model_version, num_examples, params)
        result = await client.wait_for_outcome(job, state.round, timeout=round_timeout)
        results.append(result)
        if on_round is not None:
            on_round(result)
        next_round = result.round + 1  # asynchronous: the buffer the update went into
        if not result.state.phase.running:
            break
    return results


def train_rounds(
    url: str,
    job: str,
    client_id: str,
    model: Any,
    train: Callable[[Any], int],
    rounds: int,
    *,
    round_timeout: float | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
    **connect: Any,
) -> list[RoundResult]:
    """Connects as ``client_id`` (``connect`` takes :meth:`ShoalClient.connect`'s credentials and
    TLS options) and takes part in up to ``rounds`` rounds of ``job``: each waits for an open
    round, loads the global model into ``model``, calls ``train(model)`` (which returns its
    number of examples), publishes the result (a delta from the global model for delta jobs) and
    waits for the round's outcome. Stops early when the job ends.

    Returns one :class:`~shoal.client.RoundResult` per round taken part in. A refused update
    raises its :class:`~shoal.errors.UpdateRejected` subclass."""

    async def run() -> list[RoundResult]:
        async with await ShoalClient.connect(url, client_id, **connect) as client:
            return await train_rounds_async(client, job, model, train, rounds, round_timeout=round_timeout, on_round=on_round)

    return asyncio.run(run())
