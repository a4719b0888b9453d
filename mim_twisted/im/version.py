"""XEP-0092 software version of the server: name and version, without the operating system.

The OS is optional in the result and left out: its Security Considerations note that it helps
an attacker aim at the operating system.
"""

from typing import TYPE_CHECKING

from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

import mim_twisted
from mim_twisted.im.sessions import Session

if TYPE_CHECKING:
    from mim_twisted.im.disco import DiscoService
    from mim_twisted.im.router import Router

NS_VERSION = "jabber:iq:version"
SOFTWARE_NAME = "mim-twisted"


def install(router: "Router", disco: "DiscoService") -> None:
    router.server_iq[NS_VERSION, "query"] = server_version
    disco.add_server_feature(NS_VERSION)


def server_version(session: Session, iq: domish.Element, target: JID) -> domish.Element:
    if iq.getAttribute("type") != "get":
        raise error.StanzaError("not-allowed", text="The version is read with type 'get'")
    result = xmlstream.toResponse(iq, "result")
    query = result.addElement((NS_VERSION, "query"))
    query.addElement("name", content=SOFTWARE_NAME)
    query.addElement("version", content=mim_twisted.__version__)
    return result
