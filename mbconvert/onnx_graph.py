"""A small ONNX graph builder: nodes and constants under construction, with unique, deterministic names.

Shared by the graphs mbconvert writes node by node: the string-in tokenizer (mbconvert.text_onnx) and the folded
MobileBERT (mbconvert.folding)."""

from __future__ import annotations

import numpy as np


class Graph:
    """Nodes and constants under construction, with unique names."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.consts, self._n = prefix, [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def const(self, value, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        array = np.array(value, dtype=object) if isinstance(value, str) else np.asarray(value)
        self.consts.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs, hint: str | None = None, outputs: int = 1, domain: str = "", **attrs):
        from onnx import helper

        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(op_type), domain=domain,
                                           **attrs))
        return names[0] if outputs == 1 else names
