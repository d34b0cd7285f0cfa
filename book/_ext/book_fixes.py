"""Local Sphinx extension for this book: fixes that belong to the build, not to any page.

* Script bodies registered once, written twice. Extensions that add an inline script after the HTML builder
  has started (sphinx-thebe does so in ``env-before-read-docs``) have it stored twice by Sphinx 7.4: once
  directly on the builder with ``filename=None`` and once more from the registry with ``filename=''`` when
  writing starts, and the two do not compare equal. Every page then declared ``const THEBE_JS_URL`` twice and
  the browser reported ``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``. Every asset added
  through ``app.add_js_file`` is also in the registry, so dropping the builder's ``filename=None`` copies before
  writing loses nothing: the registry's copy is written once.
"""
from __future__ import annotations


def _drop_unnamed_script_copies(app, env):
    builder = app.builder
    files = getattr(builder, "_js_files", None)
    if files is None:  # not an HTML builder
        return None
    registry_bodies = {attrs.get("body") for name, attrs in app.registry.js_files if not name}
    builder._js_files = [
        js for js in files
        if not (getattr(js, "filename", "") is None and js.attributes.get("body") in registry_bodies)
    ]
    return None


def setup(app):
    app.connect("env-updated", _drop_unnamed_script_copies, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
