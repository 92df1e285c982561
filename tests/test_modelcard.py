"""Model cards: written into checkpoints, finetuned models and HF exports, with the facts of the run."""

from __future__ import annotations

import json

import jax
import pytest
import yaml

from jaxbert import checkpoint as ckpt
from conftest import tiny
from jaxbert import config
from jaxbert.checkpoint import Progress
from jaxbert.finetune.model_dir import load_classifier, save_classifier
from jaxbert.hf.cli import export_main
from jaxbert.model import BertForClassification
from jaxbert.checkpoint import pretraining_facts
from jaxbert.tokenizer import load_tokenizer
from jaxbert.train import init_state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny pretraining run with one checkpoint at step 10 (80 sequences of 32 tokens) and two evaluations."""
    root = tmp_path_factory.mktemp("card")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                              [f"w{i}" for i in range(123)]) + "\n")
    tokenizer = load_tokenizer(root / "vocab.txt")
    cfg = tiny("data.source=my_corpus/")
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "split": "eval", "loss": 3.5, "accuracy": 0.25, "masked_accuracy": 0.2}) + "\n" +
        json.dumps({"step": 8, "split": "train", "loss": 3.0}) + "\n" +
        json.dumps({"step": 20, "split": "eval", "loss": 1.0, "accuracy": 0.9}) + "\n")  # after the checkpoint
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    path = ckpt.save_checkpoint(run, cfg, state, Progress(10, 80, 1.0), tokenizer, keep=2)
    return cfg, tokenizer, state, run, path


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_checkpoint_card_has_data_tokens_mlm_config_and_command(setup):
    cfg, _, _, run, path = setup
    meta, body = _split((path / "README.md").read_text())
    assert meta["library_name"] == "jaxbert" and meta["pipeline_tag"] == "fill-mask"
    assert "Corpus: `my_corpus/`" in body and "sequences of 32 tokens" in body
    assert "Steps: 10; tokens seen: 2,560" in body  # 80 sequences x 32 tokens
    assert "At step 5: held-out MLM loss 3.5000, MLM accuracy (all targets) 0.2500" in body
    assert "MLM accuracy ([MASK]ed positions) 0.2000" in body and "0.9000" not in body
    config_block = body.split("## Config\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(config_block)["model"]["hidden"] == 32
    assert "## Command\n\n```bash\n" in body and "## GLUE dev" in body
    assert "README.md" in json.loads((path / "manifest.json").read_text())["files"]  # checksummed like the rest
    assert pretraining_facts(run)["tokens_seen"] == 2560


def test_finetuned_card_has_dev_table_and_traces_its_pretraining(setup, tmp_path):
    cfg, tokenizer, state, _, path = setup
    model = BertForClassification(cfg.model, 2, key=jax.random.PRNGKey(1), bert=state.model.bert)
    meta = {"task": "rte", "labels": ["entailment", "not_entailment"], "epoch": 2, "score": 0.625,
            "dev": {"dev": {"accuracy": 0.625}}, "init": str(path)}
    saved = save_classifier(tmp_path / "rte", cfg, model, tokenizer, meta)
    head, body = _split((saved / "README.md").read_text())
    assert head["pipeline_tag"] == "text-classification"
    result = head["model-index"][0]["results"][0]
    assert result["dataset"]["config"] == "rte" and result["metrics"] == [{"type": "accuracy", "value": 0.625}]
    assert "| rte | dev | accuracy | 62.50 |" in body and "entailment, not_entailment (2 outputs)" in body
    assert f"Started from: `{path}`" in body and "tokens seen: 2,560" in body
    assert load_classifier(saved)[3]["task"] == "rte"  # the card does not disturb loading

    assert export_main([str(saved), str(tmp_path / "hf")]) == 0  # the HF export carries the card
    exported = (tmp_path / "hf" / "README.md").read_text()
    assert exported.startswith((saved / "README.md").read_text().rstrip("\n")) and "\n## Export\n" in exported


def test_hf_export_of_a_pretraining_run_carries_its_card(setup, tmp_path):
    _, _, _, run, path = setup
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "tokens seen: 2,560" in card and "## Export" in card
    assert (tmp_path / "hf" / "modules.json").is_file()
    model_dir = ckpt.save_model(tmp_path / "model", *ckpt.load_pretrained(path)[:2], path / "tokenizer")
    assert "## Config" in (model_dir / "README.md").read_text()


def test_imported_model_card_names_its_source(tmp_path):
    from jaxbert.modelcard import pretraining_card

    cfg = config.load("tiny")
    card = pretraining_card(cfg, {"imported_from": "/models/minilm"}, command="jaxbert import-hf /models/minilm")
    assert "Imported from the HuggingFace model `/models/minilm`" in card and "Corpus:" not in card
    assert "not recorded (not a jaxbert pretraining checkpoint)" in card
    assert "```bash\njaxbert import-hf /models/minilm\n```" in card
