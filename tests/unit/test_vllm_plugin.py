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
