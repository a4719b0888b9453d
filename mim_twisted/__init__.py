"""mim-twisted: an XMPP server on Twisted with the MongooseIM 3.3 feature set."""

from mim_twisted import wokkel_compat

wokkel_compat.install()

__version__ = "0.1.0"
