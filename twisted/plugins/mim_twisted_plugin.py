"""The twistd dropin: `twistd mim` runs mim-twisted (see mim_twisted.tap)."""

from twisted.application.service import ServiceMaker

mim = ServiceMaker(
    "mim-twisted",
    "mim_twisted.tap",
    "An XMPP server with PubSub/PEP on SQL storage (MongooseIM 3.3 feature set)",
    "mim",
)
