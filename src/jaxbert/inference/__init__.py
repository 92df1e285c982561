"""Using a trained model: :mod:`.api` (``jaxbert.load`` and :class:`Model`), :mod:`.predict` (labels and dev
metrics of a finetuned model), :mod:`.fill_mask`, :mod:`.embed`, and :mod:`.cli` (``jaxbert predict``,
``evaluate``, ``fill-mask``, ``embed``).
"""
