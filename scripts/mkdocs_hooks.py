"""mkdocs hooks (``hooks:`` in mkdocs.yml): site pages made of the repository's own Markdown files.

1. A line ``--8<-- "cluster/README.md"`` in a page under docs/ is replaced by that file (a path from
   the repository root). So ``cluster/README.md``, ``manifests/schema.md`` and the like stay beside
   the code they describe (and reviewers edit them there), and the site shows them without a copy.
2. Relative links that leave docs/, in a page or in what it includes, are rewritten: to the page
   that includes the target file (with its anchor); to ``index.md`` for the repository's README; to
   an image that ``on_files`` adds to the site (``repo/<path>``); any other file of the repository
   (a YAML, a script) becomes its path in code, since the site holds no copy of it. Everything
   else is left to mkdocs, whose ``--strict`` build fails on a link that still goes nowhere.
3. A line ``<!-- options: run / Input -->`` becomes the table of that command's options in that
   ``--help`` panel (``Options`` for those without one), made from the CLI itself: option, default,
   what it does. So the Running page lists exactly the options ``run --help`` shows, grouped alike.
"""

from __future__ import annotations

import enum
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
DOCS = "docs"
INCLUDE = re.compile(r'^--8<-- "([^"]+)"[ \t]*$', re.M)
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")  # [text](target), ![alt](src)
IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".gif")
SITE_COPY = "repo"  # where images from outside docs/ land in the site
OPTIONS = re.compile(r"^<!-- options: (.+?) / (.+?) -->[ \t]*$", re.M)
DEFAULT_PANEL = "Options"  # typer's panel for options without rich_help_panel


def _included() -> dict[str, str]:
    """Repository path of each included file -> the docs page (``src_uri``) that includes it."""
    found = {}
    for page in sorted((REPO / DOCS).rglob("*.md")):
        for path in INCLUDE.findall(page.read_text(encoding="utf-8")):
            found.setdefault(path, page.relative_to(REPO / DOCS).as_posix())
    return found


def _outside_images() -> list[str]:
    """Images outside docs/ that some page (or included file) links to."""
    images = set()
    for page in sorted((REPO / DOCS).rglob("*.md")):
        sources = [(page.relative_to(REPO).as_posix(), page.read_text(encoding="utf-8"))]
        sources += [(p, (REPO / p).read_text(encoding="utf-8")) for p in INCLUDE.findall(sources[0][1])]
        for source, text in sources:
            for _, _, target in LINK.findall(text):
                path = _resolve(source, target)
                if path and path.endswith(IMAGE_SUFFIXES) and not path.startswith(DOCS + "/"):
                    images.add(path)
    return sorted(p for p in images if (REPO / p).is_file())


def _resolve(source: str, target: str) -> str | None:
    """A relative link's target as a repository path (None for URLs, anchors, absolute paths)."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = target.partition("#")[0]
    return posixpath.normpath(posixpath.join(posixpath.dirname(source), path)) if path else None


def _rewrite(text: str, source: str, page: str, included: dict[str, str]) -> str:
    """``text`` (from repository file ``source``) as it reads on docs page ``page``."""
    page_dir = posixpath.dirname(page)

    def relative(site_path: str) -> str:
        return posixpath.relpath(site_path, page_dir or ".")

    def replace(match: re.Match) -> str:
        bang, label, target = match.groups()
        path = _resolve(source, target)
        if path is None:
            return match.group(0)
        anchor = "#" + target.partition("#")[2] if "#" in target else ""
        if path.startswith(DOCS + "/"):
            new = relative(path.removeprefix(DOCS + "/")) + anchor
        elif path in included:
            new = relative(included[path]) + anchor
        elif path == "README.md":
            new = relative("index.md")
        elif path.endswith(IMAGE_SUFFIXES) and (REPO / path).is_file():
            new = relative(f"{SITE_COPY}/{path}")
        else:  # a file the site has no copy of: name it
            return label if f"`{path}`" in label or path in label else f"{label} (`{path}`)"
        return f"{bang}[{label}]({new})"

    return LINK.sub(replace, text)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(param) -> str:
    value = param.default
    if getattr(param, "is_flag", False):
        return "off" if not value else "on"
    if value is None or getattr(param, "multiple", False) or value is ...:
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value}`"


def options_table(command_path: str, panel: str) -> str:
    """A Markdown table of ``command_path``'s options in ``--help`` panel ``panel``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # this checkout's CLI, installed or not
    import typer

    from pipeline.cli import app

    command = typer.main.get_command(app)
    for word in command_path.split():
        command = command.commands[word]
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for param in command.params:
        if param.param_type_name != "option" or (param.rich_help_panel or DEFAULT_PANEL) != panel:
            continue
        names = ", ".join(f"`{name}`" for name in sorted(param.opts, key=len, reverse=True))
        what = param.help or ""
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is not None and descriptor.is_choice:
            what += " One of " + ", ".join(f"`{getattr(c, 'value', c)}`" for c in descriptor.choices) + "."
        if getattr(param, "multiple", False) and "repeatable" not in what.lower():
            what += " Repeatable."
        if param.envvar:
            what += f" Environment: `{param.envvar}`."
        if param.required:
            what += " Required."
        rows.append(f"| {names} | {_cell(_default(param))} | {_cell(what)} |")
    if len(rows) == 2:
        raise ValueError(
            f"<!-- options: {command_path} / {panel} -->: no option of that command in that panel"
        )
    return "\n".join(rows)


def on_files(files, config):
    """Images outside docs/ that pages show (benchmark plots) join the site under ``repo/``."""
    for path in _outside_images():
        files.append(File.generated(config, f"{SITE_COPY}/{path}", abs_src_path=str(REPO / path)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Includes expanded, links that leave docs/ rewritten (see the module docstring)."""
    included = _included()
    src = page.file.src_uri
    own = f"{DOCS}/{src}"

    def include(path: str) -> str:
        if not (REPO / path).is_file():
            raise FileNotFoundError(f"{own}: --8<-- {path!r}: no such file in the repository")
        return _rewrite((REPO / path).read_text(encoding="utf-8"), path, src, included)

    markdown = OPTIONS.sub(lambda m: options_table(m.group(1), m.group(2)), markdown)
    parts = INCLUDE.split(markdown)  # text, path, text, path, ...: rewrite the page's own text too
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(include(part))
        else:
            out.append(_rewrite(part, own, src, included))
    return "".join(out)
