"""The appliance: settings, state, audit log, key store, CLI, batch, systemd units."""
