# Makes templates/ the package cyrushelper.templates (see setup.cfg): importlib.resources finds the
# .j2 files in every kind of install, an editable one included (a namespace package is not found there).
