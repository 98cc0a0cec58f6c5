"""The vLLM plugin (service/worker/vllm_plugin.py) reaches the engine core only through the
installed entry point: vLLM loads `vllm.general_plugins` in every process it starts. Its effect
on a real engine is tested in tests/integration/test_seeded_chunked_prefill.py."""

from __future__ import annotations

from importlib.metadata import entry_points

from service.worker import vllm_plugin


def test_the_plugin_is_an_installed_vllm_general_plugin() -> None:
    found = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert "octograph" in found, "the entry point is missing: reinstall (scripts/setup.sh)"
    assert found["octograph"].load() is vllm_plugin.register


def test_register_lets_vllm_load_an_inductor_aot_artifact() -> None:
    """vLLM's AOT loader calls `finalize_loading` on what it loaded; on CPU that is torch's
    Inductor bundle, which has no such method: without the plugin the load fails and the model
    is compiled again at every start."""
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable

    vllm_plugin.register()
    vllm_plugin.register()  # idempotent
    finalize = BundledAOTAutogradSerializableCallable.finalize_loading
    bundle = BundledAOTAutogradSerializableCallable.__new__(BundledAOTAutogradSerializableCallable)
    assert bundle.finalize_loading(object()) is None
    assert BundledAOTAutogradSerializableCallable.finalize_loading is finalize
