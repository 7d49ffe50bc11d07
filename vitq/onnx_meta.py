"""Node metadata the exporter writes and the graph passes read (torch-free, so the passes and ``vitq.runtime``'s
plugin expansion import no torch)."""

from __future__ import annotations

import json

import onnx

#: per node, the timm module scopes it came from (torch's dynamo exporter)
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def module_name(node: onnx.NodeProto) -> str | None:
    """The timm module path a node came from (e.g. ``blocks.3.attn.qkv``), from the exporter's name scopes:
    the last scope entry is the op itself, the one before it is the innermost module."""
    for p in node.metadata_props:
        if p.key == NAME_SCOPES_KEY:
            try:
                scopes = json.loads(p.value.replace("'", '"'))
            except json.JSONDecodeError:
                return None
            mods = [s for s in scopes[:-1] if s]
            return mods[-1] if mods else ""
    return None
