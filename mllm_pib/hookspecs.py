"""Hook specifications of the ``mllm_pib`` plugin system.

A plugin is a module registered under the entry-point group ``mllm_pib``; it implements some of
the hooks below with the :data:`hookimpl` marker. Built-in backbones (LLaVA-1.5, InstructBLIP,
MiniGPT-4) are plugins too: separate distributions that use this very mechanism.

Example, in ``my_backbone/plugin.py``::

    from mllm_pib import BackboneSpec, hookimpl

    @hookimpl
    def mllm_pib_register_backbones():
        return [BackboneSpec(name="mine", description="My MLLM", load=load_mine)]

and in the plugin's ``pyproject.toml``::

    [project.entry-points.mllm_pib]
    mine = "my_backbone.plugin"
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "mllm_pib"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def mllm_pib_register_backbones():
    """Return the backbones this plugin provides.

    :return: a list of :class:`mllm_pib.BackboneSpec`. Each spec's ``name`` must be unique
        across all installed plugins; two plugins claiming the same name is an error that names
        both distributions.

    The hook is called once per process, when the plugin registry is first used, and for each
    plugin on its own: a plugin whose hook raises or returns anything but a list of specs is
    reported with its distribution and skipped, without hiding the other plugins' backbones.
    It must be cheap: return specs whose ``load`` callables import heavy modules lazily, so
    that listing backbones never loads a model. See ``docs/plugins.md``.
    """
