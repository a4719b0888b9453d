"""The dropin package of mim-twisted extensions (see mim_twisted.extensions).

A separate distribution ships a module ``mim_twisted/plugins/<its name>.py`` (and no
``__init__.py`` there, nor in ``mim_twisted/``) that holds an object providing IMimExtension.
The lines below are twisted.plugins' own: they add every ``mim_twisted/plugins`` directory found
on ``sys.path`` to this package, so dropins installed apart from mim-twisted itself (another
site-packages, an editable install) are found as well.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821 (defined by the import system)
__all__: list[str] = []
