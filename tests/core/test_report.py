"""The report's rendering and the sweep's frontier (the pipeline's report end to end: tests/core/test_pipeline.py)."""

from pathlib import Path

from core.report import _frontier, render


def test_model_text_in_a_markdown_table_stays_text_in_its_own_row():
    # samples are model output: raw HTML in report.md would run in a viewer that renders it, and a "\r"
    # (byte-level tokenizers produce one) ended the table row
    rows = [["prompt", "reply"], ["<script>alert(1)</script>", "one\rtwo | three\nfour"], ["b", "it's"]]
    md, page = render([("table", rows)], Path("."))
    lines = md.strip().split("\n")
    assert len(lines) == 4  # header, rule, two rows
    assert lines[2] == "| &lt;script&gt;alert(1)&lt;/script&gt; | one two \\| three four |"
    assert lines[3] == "| b | it's |"  # quotes left as they are
    assert "<script>" not in md and "<script>" not in page


def test_the_frontier_keeps_the_best_gold_at_equal_kl():
    # sorted by (KL, gold), the worse point at equal KL came first and was kept
    assert _frontier([(1.0, 0.5), (1.0, 0.7), (2.0, 0.6), (3.0, 0.9)]) == [(1.0, 0.7), (3.0, 0.9)]
