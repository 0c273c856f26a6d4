"""One book, many documents: a long PDF / docx / Markdown file is cut at its outline, headings or page groups,
and the rule used is in the prepare stats."""

import json
from collections import Counter

from domainlm.data.readers import ReadOptions, read_file
from domainlm.data.sections import PAGES_PER_DOCUMENT, is_heading_text
from tests.pdf import write_pdf

BODY = [
    "The contractor shall keep the site clean and safe at all times.",
    "Inspections are recorded in the quality log with date and signature.",
    "Costs are reported monthly against the approved budget lines.",
    "Deviations from the schedule are explained in the weekly report.",
]


def page(i: int, heading: str | None = None) -> list[str]:
    lines = [heading] if heading else []
    tag = "".join(chr(ord("a") + int(d)) for d in str(i))  # letters: page furniture detection blanks digits only
    return lines + [f"{line} Item {i}.{k} {tag}." for k, line in enumerate(BODY * 2)]


def read(path):
    counters = Counter()
    return list(read_file(path, ReadOptions(), counters))


def add_outline(path, entries):
    """entries: (title, page, children) with children (title, page)."""
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=str(path))
    for title, page_number, children in entries:
        parent = writer.add_outline_item(title, page_number)
        for child_title, child_page in children:
            writer.add_outline_item(child_title, child_page, parent=parent)
    with open(path, "wb") as f:
        writer.write(f)


def test_pdf_with_bookmarks_is_cut_at_them(tmp_path):
    p = tmp_path / "book.pdf"
    write_pdf(p, [page(i) for i in range(12)])
    # two chapters with two sections each (the top two outline levels) + a third-level entry that is ignored
    add_outline(p, [("Part A", 1, [("A.1", 1), ("A.2", 3)]), ("Part B", 6, [("B.1", 6), ("B.2", 9)])])
    docs = read(p)
    assert [d.split for d in docs] == ["outline"] * 5  # front matter (page 0), A.1, A.2, B.1, B.2
    assert "Item 0.0" in docs[0].text and "Item 1.0" not in docs[0].text
    assert "Item 3.0" in docs[2].text and "Item 5.7" in docs[2].text and "Item 6.0" not in docs[2].text
    assert "Item 11.7" in docs[-1].text


def test_pdf_without_bookmarks_is_cut_at_chapter_headings_else_page_groups(tmp_path):
    p = tmp_path / "chapters.pdf"
    write_pdf(p, [page(i, f"Chapter {i // 3 + 1}" if i % 3 == 0 else None) for i in range(9)])
    docs = read(p)
    assert [d.split for d in docs] == ["heading-text"] * 3
    assert docs[1].text.startswith("Chapter 2")
    plain = tmp_path / "plain.pdf"
    write_pdf(plain, [page(i) for i in range(12)])
    docs = read(plain)
    assert len(docs) == -(-12 // PAGES_PER_DOCUMENT) and {d.split for d in docs} == {"page-groups"}
    short = tmp_path / "short.pdf"
    write_pdf(short, [page(0)])
    assert [d.split for d in read(short)] == ["whole"]


def test_docx_is_cut_at_heading_styles_else_at_heading_text(tmp_path):
    import docx

    filler = "本条款规定了工程质量验收的程序和标准，各方应当严格遵守。" * 8
    d = docx.Document()
    d.add_heading("施工管理手册", level=0)
    for ch in range(1, 4):
        d.add_heading(f"第{ch}章 总则", level=1)
        for sec in range(1, 3):
            d.add_heading(f"{ch}.{sec} 范围", level=2)
            d.add_paragraph(filler)
            d.add_heading("细则", level=3)  # a third level does not cut
            d.add_paragraph(filler)
    styled = tmp_path / "styled.docx"
    d.save(styled)
    docs = read(styled)
    assert len(docs) == 6 and {x.split for x in docs} == {
        "headings"
    }  # title + chapter headings join their first section
    assert docs[0].text.startswith("施工管理手册\n第1章 总则\n1.1 范围")
    plain = docx.Document()
    for ch in ("一", "二", "三"):
        plain.add_paragraph(f"第{ch}章 术语")
        plain.add_paragraph(filler * 4)
    p = tmp_path / "plain.docx"
    plain.save(p)
    docs = read(p)
    assert [x.text.split("\n")[0] for x in docs] == ["第一章 术语", "第二章 术语", "第三章 术语"]
    assert {x.split for x in docs} == {"heading-text"}


def test_markdown_is_cut_at_headings_outside_code_and_short_files_stay_whole(tmp_path):
    text = "Quality inspections are recorded with date and signature. " * 10
    md = "# Handbook\n\n" + "".join(f"## Section {i}\n\n{text}\n\n```\n# not a heading\n```\n\n" for i in range(1, 5))
    p = tmp_path / "h.md"
    p.write_text(md, encoding="utf-8")
    docs = read(p)
    assert len(docs) == 4 and {d.split for d in docs} == {"headings"}
    assert docs[1].text.startswith("Section 2") and docs[1].line == md.split("\n").index("## Section 2") + 1
    small = tmp_path / "s.md"
    small.write_text("# A\n\ntext one.\n\n# B\n\ntext two.\n", encoding="utf-8")
    assert [d.split for d in read(small)] == ["whole"]


def test_heading_text_rules():
    for heading in (
        "第一章 总则",
        "第3节 范围",
        "第十二条",
        "Chapter 4",
        "CHAPTER IV Costs",
        "Part 2",
        "1.2 Scope",
        "3 总则",
        "2.1.3 验收标准",
        "4、 术语",
    ):
        assert is_heading_text(heading) == (heading != "4、 术语"), heading
    for sentence in (
        "第一章规定的内容适用于全部工程，各方应当遵守。",
        "3.5 days late.",
        "2019年工程进度",
        "12,000 元",
        "1.5%",
        "Chapter text on page 3 continues here.",
    ):
        assert not is_heading_text(sentence), sentence


def test_prepare_records_the_rule_in_stats(tmp_path, tokenizer_dir, capsys):
    from domainlm.cli import main

    p = tmp_path / "book.pdf"
    write_pdf(p, [page(i) for i in range(8)])
    add_outline(p, [("One", 0, []), ("Two", 4, [])])
    txt = tmp_path / "notes.txt"
    txt.write_text("A note on costs.\n\nA note on quality.\n", encoding="utf-8")
    assert (
        main(
            [
                "prepare",
                str(p),
                str(txt),
                "--out",
                str(tmp_path / "c"),
                "--tokenizer",
                tokenizer_dir,
                "--workers",
                "0",
                "--min-doc-chars",
                "1",
            ]
        )
        == 0
    )
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert stats["document_split"] == {"outline": {"files": 1, "documents": 2}}
    assert stats["documents"] == 4
    assert "document_split" in capsys.readouterr().out
    assert (
        main(
            [
                "prepare",
                str(p),
                "--out",
                str(tmp_path / "w"),
                "--tokenizer",
                tokenizer_dir,
                "--workers",
                "0",
                "--no-split-books",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "w" / "stats.json").read_text())["document_split"] == {
        "whole": {"files": 1, "documents": 1}
    }


def test_utf16_text_with_bom_is_read(tmp_path):
    text = "工程质量验收标准。\n\n成本数据统计。\n"
    for encoding in ("utf-16-le", "utf-16-be"):
        p = tmp_path / f"{encoding}.txt"
        p.write_bytes(("\ufeff" + text).encode(encoding))
        assert [d.text for d in read(p)] == ["工程质量验收标准。", "成本数据统计。"]
