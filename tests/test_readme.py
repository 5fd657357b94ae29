"""README.md is the five-minute introduction: its quick-start blocks run as written, it stays short, and every page
and file it links to exists."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_quick_start_blocks_run_as_written(capsys):
    readme = _read("README.md")
    section = readme[readme.index("## Quick start"):readme.index("\n## ", readme.index("## Quick start") + 1)]
    blocks = re.findall(r"```python\n(.+?)```", section, flags=re.S)
    assert len(blocks) == 3  # the training loop, the Hugging Face one-liner, every dropout site
    namespace = {}
    for i, code in enumerate(blocks):  # in order, in one namespace, as a reader pastes them
        exec(compile(code, f"README.md (quick start, block {i + 1})", "exec"), namespace)
    printed = capsys.readouterr().out
    assert re.match(r"ce \d+\.\d{3}  explicit \d+\.\d{4}  implicit [+-]\d+\.\d{4}", printed), printed
    out = namespace["out"]
    assert float(out.explicit.detach()) > 0 and float(out.ce.detach()) > 0
    assert namespace["body"][0].weight.grad is not None  # the every-site terms reached the embedding


def test_readme_is_short_and_its_links_resolve():
    readme = _read("README.md")
    assert readme.count("\n") <= 250
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert len(targets) >= 10
    missing = [t for t in targets if not t.startswith("http") and not os.path.exists(os.path.join(ROOT, t))]
    assert not missing, missing


def test_topic_pages_link_to_files_that_exist():
    docs = os.path.join(ROOT, "docs")
    missing = []
    for name in sorted(os.listdir(docs)):
        if not name.endswith(".md"):
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(os.path.join("docs", name))):
            if not target.startswith("http") and not os.path.exists(os.path.join(docs, target)):
                missing.append((name, target))
    assert not missing, missing
