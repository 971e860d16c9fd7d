"""Code both services import: configuration, models, the ledger and notifications."""
