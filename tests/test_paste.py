"""dmr.paste: the README's results section is the generated summary, replaced between its markers."""
import pytest

from dmr import paste

README = f"# dmr\n\nintro\n\n## Results\n\n{paste.BEGIN}old note\n\nold table\n{paste.END}\n\n## Next\n"


def test_replaces_only_the_marked_section():
    out = paste.paste(README, "| a | b |\n|---|---|\n| 1 | 2 |\n\n", "Built at abc1234.")
    assert out == (f"# dmr\n\nintro\n\n## Results\n\n{paste.BEGIN}Built at abc1234.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
                   f"{paste.END}\n\n## Next\n")
    assert paste.paste(out, "| a | b |\n|---|---|\n| 1 | 2 |", "Built at abc1234.") == out  # idempotent


@pytest.mark.parametrize("readme", ["no markers", README + paste.END, paste.END + "\n" + paste.BEGIN])
def test_refuses_a_readme_without_one_pair_of_markers(readme):
    with pytest.raises(ValueError, match="marker|before"):
        paste.paste(readme, "table", "note")


def test_cli_writes_nothing_past_the_size_limit(tmp_path):
    readme, summary = tmp_path / "README.md", tmp_path / "summary.md"
    readme.write_text(README)
    summary.write_text("x" * 500)
    with pytest.raises(SystemExit, match="over --max-bytes 300"):
        paste.main([str(summary), str(readme), "--note", "n", "--max-bytes", "300"])
    assert readme.read_text() == README
    with pytest.raises(SystemExit, match="--note"):
        paste.main([str(summary), str(readme), "--note", " "])
    paste.main([str(summary), str(readme), "--note", "Built at abc1234."])
    assert "x" * 500 in readme.read_text() and "old table" not in readme.read_text()


def test_summary_headings_nest_under_the_readme_section():
    """The summary's title goes (the note names the run) and its cells sit one level below the
    README's `## Results`, each deeper heading keeping its depth below that."""
    summary = "# Results summary\n\nGenerated.\n\n## house/tiny\n\n### The claim\n\n| a |\n\n## Where the time goes\n"
    out = paste.paste(README, summary, "Built at abc1234.")
    body = out[out.index(paste.BEGIN) + len(paste.BEGIN):out.index(paste.END)]
    assert body == ("Built at abc1234.\n\nGenerated.\n\n### house/tiny\n\n#### The claim\n\n| a |\n\n"
                    "### Where the time goes\n")
    assert paste.paste(out, summary, "Built at abc1234.") == out
