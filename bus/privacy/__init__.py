"""Private records: sealing them under their data subject's key, the key store, and forgetting.

    sealing.py   which kinds are private, seal/open (AES-256-GCM); pure
    keyring.py   the key store (a NATS KV bucket): read, make and erase keys
    forget.py    `bus forget`: erase a data subject's key and record the act
"""
