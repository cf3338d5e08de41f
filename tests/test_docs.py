"""The README and docs/ stay true: the generated recipe reference is current, links resolve, the
README stays short, and every command it shows is one that CI or a test runs."""

import importlib.util
import inspect
import re
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
CONFIG = PROJECT_ROOT / "steps" / "config.py"
MAX_README_BYTES = 15_000

# The Quick start's two commands, exactly as CI runs them.
QUICK_START = [
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" '
    "&& python flows/sft_flow.py run",
    ". .venv/bin/activate && python -m pytest -q",
]
# Any other command in a README ```bash block -> the test that runs it (file::function).
TESTED_COMMANDS = {
    "python docs/gen_recipes.py --check": "tests/test_docs.py::test_recipe_reference_is_current",
}


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_recipes", DOCS / "gen_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_recipe_reference_is_current():
    """`python docs/gen_recipes.py --check`: docs/recipes.md is what steps/config.py generates now."""
    result = subprocess.run([sys.executable, "docs/gen_recipes.py", "--check"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{result.stderr} (run `python docs/gen_recipes.py` and commit docs/recipes.md)"
    assert (DOCS / "recipes.md").read_text(encoding="utf-8") == load_generator().render(
        CONFIG.read_text(encoding="utf-8"))


def test_recipe_reference_check_fails_when_a_docstring_changes(tmp_path):
    """The check above can fail: a changed field docstring changes the page, and --check says so."""
    gen = load_generator()
    source = CONFIG.read_text(encoding="utf-8")
    old = '"""Peak learning rate of AdamW."""'
    assert source.count(old) == 1, "pick another docstring: this one changed"
    edited = source.replace(old, '"""Peak learning rate of AdamW, after warmup."""')
    page, edited_page = gen.render(source), gen.render(edited)
    assert page != edited_page
    assert "| `train.lr` | `float` | `0.002` | Peak learning rate of AdamW, after warmup. |" in edited_page

    # The script's --check, pointed at the edited copy, exits non-zero and writes nothing.
    (tmp_path / "steps").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "steps" / "config.py").write_text(edited, encoding="utf-8")
    (tmp_path / "docs" / "recipes.md").write_text(page, encoding="utf-8")
    gen.CONFIG, gen.PAGE, gen.ROOT = tmp_path / "steps" / "config.py", tmp_path / "docs" / "recipes.md", tmp_path
    assert gen.main(["--check"]) == 1
    assert (tmp_path / "docs" / "recipes.md").read_text(encoding="utf-8") == page
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0


def test_recipe_reference_has_a_row_for_every_field():
    import dataclasses
    import typing

    from steps.config import Recipe

    def leaves(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, name = hints[f.name], prefix + f.name
            args = typing.get_args(hint)
            if dataclasses.is_dataclass(hint):
                yield from leaves(hint, name + ".")
            elif typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
                yield from leaves(args[0], name + "[].")
            else:
                yield name

    page = (DOCS / "recipes.md").read_text(encoding="utf-8")
    missing = [path for path in leaves(Recipe, "") if f"| `{path}` |" not in page]
    assert not missing, f"docs/recipes.md has no row for {missing}"


def test_readme_is_at_most_15_kb():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {MAX_README_BYTES})"


def markdown_pages():
    return [README, *sorted(DOCS.glob("*.md"))]


def without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(page):
    text = page.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", without_code(text))
    assert links or page.name == "recipes.md", f"{page.name} links nowhere"
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link {link!r} points at {path}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in github_anchors(path.read_text(encoding="utf-8")), (
                f"{page.name}: link {link!r}: {path.name} has no heading with anchor #{anchor}")


def readme_bash_commands() -> list[str]:
    """Every command in the README's ```bash blocks (comments dropped, `\\` continuations joined)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_readme_command_is_run_by_ci_or_a_test():
    commands = readme_bash_commands()
    assert commands[:2] == QUICK_START, "the Quick start's two commands changed: CI runs them as they are"
    for command in commands[2:]:
        assert command in TESTED_COMMANDS, (
            f"README runs {command!r}, which no test runs: show it as inline code, or add the test to TESTED_COMMANDS")
    assert set(TESTED_COMMANDS) <= set(commands), "TESTED_COMMANDS lists a command the README no longer shows"
    for command, test in TESTED_COMMANDS.items():
        file, _, name = test.partition("::")
        spec = importlib.util.spec_from_file_location(f"_docs_check_{name}", PROJECT_ROOT / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        function = getattr(module, name, None)
        assert callable(function), f"{test} does not exist"
        source = inspect.getsource(function)
        assert all(f'"{word}"' in source for word in command.split()[1:]), f"{test} does not run {command!r}"
