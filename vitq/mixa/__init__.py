"""MixA-Q: mixed-precision activations per token group (ViT/DeiT) or per window (Swin).

* :mod:`vitq.recipe.mixa` (not here) the recipe's ``mixa`` section, a typed object of the recipe;
* :mod:`.routing`  importance, ranking and the per-block group/token masks (torch);
* :mod:`.sim`      :class:`MixaSim`, the torch simulation (wraps :class:`vitq.quant.simulate.QuantSim`);
* :mod:`.calib`    building a ``mixa`` section: branch quantizers calibrated on their own tokens/windows;
* :mod:`.bitops`   bit-operation accounting against the uniform base recipe;
* :mod:`.search`   per-block ratio search under a bit-operation budget.

The ONNX realization is the graph pass :mod:`vitq.passes.split_windows`.
"""
