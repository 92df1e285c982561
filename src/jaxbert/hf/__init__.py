"""HuggingFace interop: :mod:`.convert` (pure state-dict <-> model conversion), :mod:`.importer` (HF directory
-> jaxbert model directory), :mod:`.export` (jaxbert run, checkpoint or model directory -> HF directory) and
:mod:`.cli` (``jaxbert import-hf`` / ``jaxbert export``).
"""
