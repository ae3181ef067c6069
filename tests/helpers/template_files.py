"""Template files written for a test, and the TemplateError rendering them raises."""

import textwrap

import pytest

from forgather.template import TemplateEnvironment, TemplateError


def write(root, files: dict[str, str | bytes]) -> None:
    """Write each file under `root` (folders made): text dedented, bytes as they are."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(textwrap.dedent(text))


def render_error(tmp_path, files, name) -> TemplateError:
    write(tmp_path, files)
    with pytest.raises(TemplateError) as caught:
        TemplateEnvironment([str(tmp_path)]).render(name)
    return caught.value
