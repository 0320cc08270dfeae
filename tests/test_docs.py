"""The README and docs/ are read by people about to run the code: their links must lead somewhere.

Checked in README.md and every docs/*.md, from the text alone (no network):
  - every relative markdown link `[text](path)` / `![alt](path)` names a file or folder that exists,
    and a `#anchor` names a heading of that page (GitHub's anchors: lower case, punctuation dropped,
    spaces to hyphens);
  - every `results/...` path the text names exists (these are where the numbers come from). A path
    written as `COMMIT:results/...` names a file of an old commit (`git show`) and is skipped, as is a
    pattern such as `results/<table>.md`;
  - the README stays a ten-minute read (<= 2,500 words, as `wc -w` counts), links every docs page,
    and keeps the table markers a retrain rewrites.
"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MAX_WORDS = 2500

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
RESULTS = re.compile(r"(?<![\w./:-])(results/[\w./-]*)([<{]?)")  # a results/ path, and the char after it
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading):
    """GitHub's anchor of a heading: 'Training time, and runs shortened' -> 'training-time-and-runs-shortened'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text):
    """The anchors of every heading of a markdown text (repeated headings get -1, -2, ...)."""
    seen, out = {}, set()
    for line in FENCE.sub("", text).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            s = slug(m.group(1))
            out.add(f"{s}-{seen[s]}" if s in seen else s)
            seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(text, base):
    """The relative links of `text` (a markdown file in folder `base`) whose file or anchor is missing."""
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else None
        if full is not None and not os.path.exists(full):
            bad.append(target)
        elif anchor and (full is None or full.endswith(".md")):
            if anchor not in anchors(read(full) if full else text):
                bad.append(target)
    return bad


def missing_results(text, root=ROOT):
    """The results/... paths named in `text` that do not exist under `root`."""
    out = []
    for path, after in RESULTS.findall(text):
        path = path.rstrip(".,")
        if after:  # a pattern such as results/<table>.md
            continue
        if not os.path.exists(os.path.join(root, path)):
            out.append(path)
    return out


def read(path):
    with open(path) as f:
        return f.read()


PAGES = [README] + DOCS


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_leads_somewhere(page):
    bad = broken_links(read(page), os.path.dirname(page))
    assert not bad, f"{os.path.relpath(page, ROOT)}: broken links {bad}: fix the path or the heading it names"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_results_path_named_exists(page):
    bad = missing_results(read(page))
    assert not bad, f"{os.path.relpath(page, ROOT)} names {bad}, which do not exist: a number needs its results file"


def test_checker_catches_a_broken_link_and_a_missing_results_file(tmp_path):
    """The checks can fail: on a tiny page, a missing file, a missing anchor and a missing results
    file are each reported; the good links, an old commit's file and a pattern are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A section, with commas\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "demo.md").write_text("table")
    page = ("# Top\n\nSee [the other page](other.md), [its section](other.md#a-section-with-commas), "
            "[top](#top), [the web](https://example.org) and `results/demo.md`.\n"
            "Broken: [gone](missing.md), [no such heading](other.md#nope), [here](#nowhere), "
            "`results/nope.json`.\nSkipped: `git show abc123:results/old.json`, `results/<table>.md`.\n"
            "```bash\necho [not a link](inside-code.md)\n```\n")
    assert broken_links(page, str(tmp_path)) == ["missing.md", "other.md#nope", "#nowhere"]
    assert missing_results(page, str(tmp_path)) == ["results/nope.json"]
    assert slug("Paper numbers (for reference; not reproduced here)") == "paper-numbers-for-reference-not-reproduced-here"


def test_readme_is_a_ten_minute_read():
    words = len(read(README).split())  # what `wc -w` counts
    assert words <= MAX_WORDS, (f"README.md has {words} words (> {MAX_WORDS}): move provenance, history and "
                                "detail to the docs/ page that answers that reader's question, and link it")


def test_readme_links_every_docs_page():
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in LINK.findall(read(README))}
    unlinked = [os.path.relpath(p, ROOT) for p in DOCS if p not in linked]
    assert not unlinked, f"README.md does not link {unlinked}: a page nobody can find from the README is lost"


@pytest.mark.parametrize("name", ["demo-table", "fmnist-table"])
def test_readme_tables_sit_between_their_markers(name):
    """A retrain rewrites what lies between <!-- NAME --> and <!-- /NAME -->: one table, once."""
    text = read(README)
    assert text.count(f"<!-- {name} -->") == 1 and text.count(f"<!-- /{name} -->") == 1, f"markers of {name}"
    inside = text.split(f"<!-- {name} -->")[1].split(f"<!-- /{name} -->")[0]
    assert "|---|" in inside and "+-" in inside, f"{name}: the markers hold no mean +- std table"
