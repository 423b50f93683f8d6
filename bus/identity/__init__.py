"""Who may do what on the bus: nkey credentials, the permissions each kind of identity gets,
and the registry that turns issued credentials into the server's authorization config.

    keys.py          nkey seeds: create, read a credential file, sign the server's nonce
    permissions.py   the grants: admin, the projection service, an agent (only itself)
    registry.py      issue / list / revoke, credential files (0600), auth.conf for the server

Revocation needs no restart: the registry rewrites `auth.conf` and the servers reload it
(SIGHUP), which closes the revoked identity's connections at once.
"""

from bus.identity.keys import Credential, load_credential
from bus.identity.permissions import Grant, Role
from bus.identity.registry import CredentialRegistry, Identity

__all__ = ["Credential", "CredentialRegistry", "Grant", "Identity", "Role", "load_credential"]
