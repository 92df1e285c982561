"""Finetuning: a classifier on a pretrained encoder, trained and evaluated per task (GLUE or custom).

Modules: :mod:`.trainer` (the per-task training run, prediction, evaluation), :mod:`.model_dir` (the start of a
run and the finetuned model directory), :mod:`.metrics` (GLUE metrics), :mod:`.sweep` (hyperparameter sweep) and
:mod:`.cli` (``jaxbert finetune`` / ``jaxbert glue``).
"""
