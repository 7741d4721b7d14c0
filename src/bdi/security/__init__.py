"""Who may change the line's models, and the record of who did: API keys (``bdi.security.keys``) and the
tamper-evident audit trail (``bdi.security.audit``). No HTTP here: ``serving.auth`` checks keys per request."""
